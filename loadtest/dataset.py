"""The data set the load tests run on: where the generator writes it and how Locust and the
benchmark read it back.

The files are the bulk loader's CSV formats (`authz_server/bulk/csv_formats.py`) plus two of our
own: `tokens.json` (bearer token -> principal, merged into the server's tokens file) and
`dataset.json` (the hot-spot families and a few counts). Locust needs only the data directory
and the server's tokens file, so it runs as well against data loaded some other way, as long as
the CSV files describe it (the smoke test writes them for data made through the API).
"""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = ROOT / "loadtest" / "out" / "data"

PARTICIPANTS = "participants.csv"
CREDITS = "credits.csv"
MERCHANTS = "merchants.csv"
ITEMS = "items.csv"
RELATIONSHIPS = "relationships.csv"
TOKENS = "tokens.json"
MANIFEST = "dataset.json"

# Prefecture-level cities standing for their provinces (GB/T 2260 codes), with a weight roughly
# proportional to insured population, and whether employees flock there to work.
REGIONS: tuple[tuple[str, str, float, bool], ...] = (
    ("110100", "北京", 22, True),
    ("120100", "天津", 14, False),
    ("130100", "石家庄", 74, False),
    ("140100", "太原", 35, False),
    ("150100", "呼和浩特", 24, False),
    ("210100", "沈阳", 42, False),
    ("220100", "长春", 24, False),
    ("230100", "哈尔滨", 31, False),
    ("310100", "上海", 25, True),
    ("320100", "南京", 85, True),
    ("330100", "杭州", 66, True),
    ("340100", "合肥", 61, False),
    ("350100", "福州", 42, False),
    ("360100", "南昌", 45, False),
    ("370100", "济南", 102, False),
    ("410100", "郑州", 99, False),
    ("420100", "武汉", 58, False),
    ("430100", "长沙", 66, False),
    ("440100", "广州", 63, True),
    ("440300", "深圳", 64, True),
    ("450100", "南宁", 50, False),
    ("460100", "海口", 10, False),
    ("500100", "重庆", 32, False),
    ("510100", "成都", 84, True),
    ("520100", "贵阳", 39, False),
    ("530100", "昆明", 47, False),
    ("540100", "拉萨", 4, False),
    ("610100", "西安", 40, False),
    ("620100", "兰州", 25, False),
    ("630100", "西宁", 6, False),
    ("640100", "银川", 7, False),
    ("650100", "乌鲁木齐", 26, False),
)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8-sig") as data:
        return list(csv.DictReader(data))


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as data:
        writer = csv.writer(data)
        writer.writerow(header)
        writer.writerows(rows)


def default_tokens_file() -> Path:
    """The server's tokens file as `medwallet-authz serve` finds it (see authz_server/settings)."""
    named = os.environ.get("MEDWALLET_TOKENS_FILE")
    if named:
        return Path(named)
    return Path(os.environ.get("MEDWALLET_DATA_DIR", "data")) / "tokens.json"


@dataclass(frozen=True)
class Family:
    """A beneficiary and the quotas it may draw on (one relationship each)."""

    beneficiary_id: str
    scheme: str
    relationship_ids: tuple[str, ...]
    quota_fen: int


@dataclass
class Workload:
    """What the load tests need to know: who can be charged, by whom, for what."""

    families: list[Family]
    # merchant kind -> [(merchant id, bearer token)] of designated merchants that have a token
    merchants: dict[str, list[tuple[str, str]]]
    eligible_items: list[str]
    ineligible_items: list[str]
    holders: list[str]
    channel_token: str | None
    admin_token: str | None
    hot_families: list[Family] = field(default_factory=list)

    @property
    def residents(self) -> list[Family]:
        return [family for family in self.families if family.scheme == "RESIDENT"]

    def regions(self) -> list[str]:
        return [code for code, _, _, _ in REGIONS]


def load_workload(data_dir: Path, tokens_file: Path) -> Workload:
    """Reads the CSV files of `data_dir` and the server's tokens file."""
    tokens = json.loads(tokens_file.read_text())
    if isinstance(tokens.get("tokens"), list):
        raise ValueError(
            f"{tokens_file} holds token digests (the server's file): pass a file of the tokens"
            " themselves, {token: principal}, as generate_data writes"
        )
    merchant_tokens: dict[str, str] = {}
    channel_token = admin_token = None
    for token, principal in tokens.items():
        kind = principal.get("kind")
        if kind == "merchant":
            merchant_tokens.setdefault(principal["merchant_id"], token)
        elif kind == "channel" and channel_token is None:
            channel_token = token
        elif kind == "admin" and admin_token is None:
            admin_token = token
    merchants: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for row in read_csv(data_dir / MERCHANTS):
        designated = row["designated"].lower() in ("true", "1", "yes")
        token = merchant_tokens.get(row["merchant_id"])
        if designated and token:
            merchants[row["kind"]].append((row["merchant_id"], token))
    eligible: list[str] = []
    ineligible: list[str] = []
    for row in read_csv(data_dir / ITEMS):
        payable = row["eligible"].lower() in ("true", "1", "yes") and row["category"] in (
            "DRUG",
            "DEVICE",
            "CONSUMABLE",
        )
        (eligible if payable else ineligible).append(row["item_code"])
    schemes = {row["participant_id"]: row["scheme"] for row in read_csv(data_dir / PARTICIPANTS)}
    quotas: dict[str, list[tuple[str, int]]] = defaultdict(list)
    holders: set[str] = set()
    for row in read_csv(data_dir / RELATIONSHIPS):
        quotas[row["beneficiary_id"]].append((row["relationship_id"], int(row["quota_fen"] or 0)))
        holders.add(row["holder_id"])
    manifest_path = data_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    hot_ids = set(manifest.get("hot_families", []))
    families: list[Family] = []
    hot: list[Family] = []
    for beneficiary_id, parts in quotas.items():
        family = Family(
            beneficiary_id,
            schemes.get(beneficiary_id, "EMPLOYEE"),
            tuple(relationship_id for relationship_id, _ in parts),
            sum(fen for _, fen in parts),
        )
        (hot if beneficiary_id in hot_ids else families).append(family)
    if not hot and families:  # no manifest: the family with the most quota
        hot = [max(families, key=lambda family: family.quota_fen)]
    return Workload(
        families=families,
        merchants=dict(merchants),
        eligible_items=eligible,
        ineligible_items=ineligible,
        holders=sorted(holders),
        channel_token=channel_token,
        admin_token=admin_token,
        hot_families=hot,
    )
