"""Generates a realistic data set and loads it through the bulk loader.

    python -m loadtest.generate_data                       # 100,000 relationships, then load
    python -m loadtest.generate_data --relationships 20000 --no-load

What it makes (deterministic for a given --seed and --prefix):
- families: an employee holder (working in a hub city or at home) sharing with a spouse, one or
  two parents (mostly residents in the home province, i.e. across provinces), children
  (residents where the holder works), now and then a grandparent or sibling; some parents are
  funded by two children, so their payments may be split across quotas;
- the holders' personal accounts credited with the quota they share and some more;
- designated pharmacies, hospitals and a premium collector in every province (a few
  pharmacies not designated), each with a bearer token;
- a catalog of drugs, devices and consumables (eligible), cosmetics and health foods (not
  eligible) and medical services (not payable at a pharmacy);
- `--hot-families` beneficiaries with three large quotas each, for the hot-spot scenario.

The files go to --out (the bulk loader's CSV formats, see authz_server/bulk/csv_formats.py),
the tokens are merged into the server's tokens file (MEDWALLET_TOKENS_FILE, else
MEDWALLET_DATA_DIR/tokens.json; a running server reads it only at start), then
`medwallet-authz load-csv` loads them into DATABASE_URL and, when REDIS_URL is set,
`medwallet-authz reconcile` gives Redis the new quotas (a server starting later does that itself).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from authz_server.runtime.progress import Progress
from loadtest import dataset
from loadtest.dataset import REGIONS

PHARMACY_BRANDS = ("老百姓大药房", "益丰大药房", "大参林", "一心堂", "国大药房", "海王星辰")
DRUGS = (
    "阿莫西林胶囊", "头孢克肟片", "布洛芬缓释胶囊", "盐酸二甲双胍片", "苯磺酸氨氯地平片",
    "阿托伐他汀钙片", "奥美拉唑肠溶胶囊", "连花清瘟胶囊", "硝苯地平控释片", "厄贝沙坦片",
    "缬沙坦胶囊", "格列美脲片", "门冬胰岛素注射液", "复方甘草片", "蒙脱石散", "氯雷他定片",
    "左氧氟沙星片", "阿司匹林肠溶片", "甲钴胺片", "维生素D滴剂", "孟鲁司特钠片", "瑞舒伐他汀钙片",
    "氯吡格雷片", "美托洛尔缓释片", "坎地沙坦酯片", "达格列净片", "西格列汀片", "雷贝拉唑钠肠溶片",
    "头孢呋辛酯片", "阿奇霉素片", "对乙酰氨基酚片", "感冒灵颗粒", "板蓝根颗粒", "藿香正气水",
    "复方丹参滴丸", "速效救心丸", "六味地黄丸", "银杏叶片", "碳酸钙D3片", "叶酸片",
)  # fmt: skip
STRENGTHS = ("0.1g", "0.25g", "0.5g", "5mg", "10mg", "20mg", "40mg", "100mg")
PACKS = ("×12粒", "×24粒", "×28片", "×30片", "×48片", "×10袋")
DEVICES = ("血糖仪", "电子血压计", "雾化器", "制氧机", "电子体温计", "助行器", "轮椅", "助听器")
CONSUMABLES = ("医用绷带", "一次性注射器", "血糖试纸", "医用外科口罩", "医用棉签", "无菌纱布",
               "采血针", "医用胶带", "导尿管", "造口袋")  # fmt: skip
NOT_ELIGIBLE = ("护肤霜", "洗发水", "蛋白粉", "鱼油软胶囊", "牙膏", "面膜", "减肥茶", "染发剂")
SERVICES = ("普通门诊诊查费", "CT检查", "核磁共振检查", "住院床位费", "静脉输液", "B超检查",
            "血常规检查", "心电图检查")  # fmt: skip
# Quota a holder gives one relative, in fen (300 to 5,000 yuan), and how likely each is.
QUOTAS = (30_000, 50_000, 100_000, 200_000, 300_000, 500_000)
QUOTA_WEIGHTS = (10, 20, 30, 20, 12, 8)
HOT_PARTS = 3


@dataclass
class Options:
    relationships: int = 100_000
    out: Path = dataset.DEFAULT_DATA_DIR
    seed: int = 1
    prefix: str = "lt"
    # Beneficiaries with HOT_PARTS quotas each; hot_quota_fen is each family's total.
    hot_families: int = 1
    hot_quota_fen: int = 3_000_000_000
    # Per-family totals for extra hot families (the benchmark sizes one per run).
    hot_quotas: list[int] = field(default_factory=list)
    show_progress: bool = True


@dataclass
class Summary:
    out: Path
    participants: Counter[str] = field(default_factory=Counter)
    regions: set[str] = field(default_factory=set)
    relations: Counter[str] = field(default_factory=Counter)
    merchants: Counter[str] = field(default_factory=Counter)
    items: Counter[str] = field(default_factory=Counter)
    relationships: int = 0
    beneficiaries: int = 0
    cross_province: int = 0
    split_families: int = 0
    quota_fen: int = 0
    credited_fen: int = 0
    hot_families: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        def kinds(counter: Counter[str]) -> str:
            return ", ".join(f"{count:,} {name.lower()}" for name, count in sorted(counter.items()))

        return [
            f"data set in {self.out} (generated in {self.seconds:.1f}s)",
            f"  participants   {sum(self.participants.values()):,} ({kinds(self.participants)})"
            f" in {len(self.regions)} pooling regions",
            f"  relationships  {self.relationships:,} ({kinds(self.relations)})",
            f"  beneficiaries  {self.beneficiaries:,}; {self.split_families:,} funded by two"
            f" or more holders; {self.cross_province:,} relationships across provinces",
            f"  money          {self.credited_fen / 100:,.2f} yuan credited,"
            f" {self.quota_fen / 100:,.2f} yuan shared as quota",
            f"  merchants      {sum(self.merchants.values()):,} ({kinds(self.merchants)})",
            f"  catalog items  {sum(self.items.values()):,} ({kinds(self.items)})",
            f"  hot families   {', '.join(self.hot_families) or 'none'}",
        ]


class _Builder:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.rng = random.Random(options.seed)
        self.participants: list[list[object]] = []
        self.credits: list[list[object]] = []
        self.relationships: list[list[object]] = []
        self.regions: dict[str, str] = {}
        self.pairs: set[tuple[str, str]] = set()
        self.funders: Counter[str] = Counter()
        self.summary = Summary(options.out)
        self.codes = [code for code, _, _, _ in REGIONS]
        self.weights = [weight for _, _, weight, _ in REGIONS]
        hubs = [(code, weight) for code, _, weight, hub in REGIONS if hub]
        self.hubs = [code for code, _ in hubs]
        self.hub_weights = [weight for _, weight in hubs]
        self.numbers: Counter[str] = Counter()
        self.target = options.relationships

    def _id(self, kind: str) -> str:
        self.numbers[kind] += 1
        return f"{self.options.prefix}-{kind}{self.numbers[kind]:07d}"

    def person(self, scheme: str, region: str, kind: str | None = None) -> str:
        participant_id = self._id(kind or ("e" if scheme == "EMPLOYEE" else "r"))
        self.participants.append([participant_id, scheme, region])
        self.regions[participant_id] = region
        self.summary.participants[scheme] += 1
        self.summary.regions.add(region)
        return participant_id

    def share(self, holder: str, beneficiary: str, relation: str, quota: int) -> None:
        self.pairs.add((holder, beneficiary))
        self.funders[beneficiary] += 1
        self.relationships.append([self._id("rel"), holder, beneficiary, relation, quota])
        self.summary.relations[relation] += 1
        self.summary.quota_fen += quota
        if self.regions[holder] != self.regions[beneficiary]:
            self.summary.cross_province += 1

    def credit(self, holder: str, amount: int) -> None:
        self.credits.append([holder, amount, f"{self.options.prefix}-credit-{holder}"])
        self.summary.credited_fen += amount

    def quota(self) -> int:
        return self.rng.choices(QUOTAS, QUOTA_WEIGHTS)[0]

    def family(self, parents_pool: list[str]) -> None:
        """One holder and the relatives they share with (possibly a parent already funded by
        a sibling). Stops adding relatives once the target is reached."""
        rng = self.rng
        home = rng.choices(self.codes, self.weights)[0]
        work = rng.choices(self.hubs, self.hub_weights)[0] if rng.random() < 0.6 else home
        holder = self.person("EMPLOYEE", work)
        relatives: list[tuple[str, str]] = []
        if rng.random() < 0.55:
            scheme = "EMPLOYEE" if rng.random() < 0.6 else "RESIDENT"
            relatives.append((self.person(scheme, work), "SPOUSE"))
        for _ in range(rng.choices((0, 1, 2), (30, 35, 35))[0]):
            if parents_pool and rng.random() < 0.15:
                parent = rng.choice(parents_pool)  # a sibling funds this parent too
                if (holder, parent) in self.pairs or any(p == parent for p, _ in relatives):
                    continue
            else:
                parent = self.person("RESIDENT" if rng.random() < 0.7 else "EMPLOYEE", home)
                parents_pool.append(parent)
            relatives.append((parent, "PARENT"))
        for _ in range(rng.choices((0, 1, 2), (55, 35, 10))[0]):
            relatives.append((self.person("RESIDENT", work), "CHILD"))
        if rng.random() < 0.03:
            relatives.append((self.person("RESIDENT", home), "GRANDPARENT"))
        if rng.random() < 0.04:
            relatives.append((self.person("RESIDENT", home), "SIBLING"))
        shared = 0
        for beneficiary, relation in relatives:
            if len(self.relationships) >= self.target:
                break
            quota = self.quota() * (2 if relation == "SPOUSE" else 1)
            self.share(holder, beneficiary, relation, quota)
            shared += quota
        self.credit(holder, shared + rng.choice((20_000, 100_000, 300_000, 1_000_000)))

    def hot_family(self, total_fen: int) -> str:
        number = len(self.summary.hot_families) + 1
        beneficiary = self.person("RESIDENT", "440300", kind="hot")
        part, rest = divmod(total_fen, HOT_PARTS)
        for index in range(HOT_PARTS):
            holder = self.person("EMPLOYEE", self.rng.choice(self.hubs), kind=f"hot{number}h")
            quota = part + (rest if index == 0 else 0)
            self.share(holder, beneficiary, "PARENT", quota)
            self.credit(holder, quota + 100_000)
        self.summary.hot_families.append(beneficiary)
        return beneficiary

    def merchants(self) -> list[list[object]]:
        rows: list[list[object]] = []
        prefix = self.options.prefix
        for code, city, weight, _ in REGIONS:
            for number in range(1, max(3, round(weight / 4)) + 1):
                designated = number % 20 != 0  # one pharmacy in twenty is not designated
                brand = PHARMACY_BRANDS[number % len(PHARMACY_BRANDS)]
                rows.append(
                    [
                        f"{prefix}-ph-{code}-{number:03d}",
                        "RETAIL_PHARMACY",
                        code,
                        str(designated).lower(),
                        f"{brand}({city}{number}店)",
                    ]
                )
            for number in range(1, max(2, round(weight / 12)) + 1):
                hospital = f"{prefix}-hosp-{code}-{number:02d}"
                name = f"{city}市第{number}人民医院"
                rows.append([hospital, "MEDICAL_INSTITUTION", code, "true", name])
            rows.append(
                [f"{prefix}-col-{code}", "PREMIUM_COLLECTOR", code, "true", f"{city}市医疗保障局"]
            )
        for row in rows:
            label = f"{row[1]}" if row[3] == "true" else f"{row[1]} (not designated)"
            self.summary.merchants[label] += 1
        return rows

    def items(self) -> list[list[object]]:
        prefix = self.options.prefix
        rows: list[list[object]] = []

        def add(kind: str, name: str, category: str, eligible: bool) -> None:
            code = f"{prefix}-{kind}{len(rows) + 1:05d}"
            rows.append([code, name, category, str(eligible).lower()])
            label = category if eligible else f"{category} (not eligible)"
            self.summary.items[label] += 1

        for drug in DRUGS:
            for strength in STRENGTHS:
                for pack in PACKS:
                    add("D", f"{drug} {strength}{pack}", "DRUG", True)
        for device in DEVICES:
            for model in range(1, 13):
                add("V", f"{device} 型号{model}", "DEVICE", True)
        for consumable in CONSUMABLES:
            for size in range(1, 13):
                add("C", f"{consumable} 规格{size}", "CONSUMABLE", True)
        for thing in NOT_ELIGIBLE:
            for variant in range(1, 13):
                add("X", f"{thing} {variant}号", "CONSUMABLE", False)
        for service in SERVICES:
            for level in ("一级", "二级", "三级"):
                add("S", f"{service}({level}医院)", "MEDICAL_SERVICE", True)
        return rows


def generate(options: Options) -> Summary:
    """Writes the CSV files, tokens.json and dataset.json to options.out."""
    started = time.monotonic()
    builder = _Builder(options)
    hot = [options.hot_quota_fen] * options.hot_families + list(options.hot_quotas)
    for total in hot:
        builder.hot_family(total)
    parents_pool: list[str] = []
    target = builder.target = options.relationships + HOT_PARTS * len(hot)
    stream = None if options.show_progress else open(os.devnull, "w")  # noqa: SIM115
    try:
        with Progress(target, "generating", unit="relationships", stream=stream) as progress:
            while len(builder.relationships) < target:
                before = len(builder.relationships)
                builder.family(parents_pool)
                progress.advance(len(builder.relationships) - before)
    finally:
        if stream is not None:
            stream.close()
    merchants = builder.merchants()
    items = builder.items()
    out = options.out
    dataset.write_csv(out / dataset.PARTICIPANTS, ["participant_id", "scheme", "pooling_region"],
                      builder.participants)  # fmt: skip
    dataset.write_csv(out / dataset.CREDITS, ["participant_id", "amount_fen", "idempotency_key"],
                      builder.credits)  # fmt: skip
    dataset.write_csv(
        out / dataset.MERCHANTS,
        ["merchant_id", "kind", "pooling_region", "designated", "name"],
        merchants,
    )
    dataset.write_csv(out / dataset.ITEMS, ["item_code", "name", "category", "eligible"], items)
    dataset.write_csv(
        out / dataset.RELATIONSHIPS,
        ["relationship_id", "holder_id", "beneficiary_id", "relation", "quota_fen"],
        builder.relationships,
    )
    prefix = options.prefix
    tokens: dict[str, dict[str, str]] = {
        f"{prefix}-admin": {"kind": "admin"},
        f"{prefix}-app": {"kind": "channel", "channel": "APP"},
        f"{prefix}-platform": {"kind": "channel", "channel": "PROVINCIAL_PLATFORM"},
        f"{prefix}-window": {"kind": "channel", "channel": "SERVICE_WINDOW"},
    }
    for row in merchants:
        tokens[f"{prefix}-tok-{row[0]}"] = {"kind": "merchant", "merchant_id": str(row[0])}
    (out / dataset.TOKENS).write_text(json.dumps(tokens, indent=1) + "\n")
    summary = builder.summary
    summary.relationships = len(builder.relationships)
    summary.beneficiaries = len(builder.funders)
    summary.split_families = sum(1 for count in builder.funders.values() if count > 1)
    (out / dataset.MANIFEST).write_text(
        json.dumps(
            {
                "seed": options.seed,
                "prefix": prefix,
                "relationships": summary.relationships,
                "participants": sum(summary.participants.values()),
                "hot_families": summary.hot_families,
            },
            indent=1,
        )
        + "\n"
    )
    summary.seconds = time.monotonic() - started
    return summary


def merge_tokens(source: Path, target: Path) -> int:
    """Adds the generated tokens to the server's tokens file (kept: tokens already there)."""
    tokens = json.loads(source.read_text())
    existing = json.loads(target.read_text()) if target.exists() else {}
    merged = {**tokens, **existing}
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(merged, indent=1) + "\n")
    return len(merged) - len(existing)


def load(
    out: Path, env: dict[str, str] | None = None, batch_size: int = 5000, stdout: Any = None
) -> int:
    """`medwallet-authz load-csv` on the generated files (its progress bars go to stderr), then
    `medwallet-authz reconcile` when REDIS_URL is set. Returns the load's exit status."""
    environment = dict(os.environ if env is None else env)
    command = [sys.executable, "-m", "authz_server.cli", "load-csv"]
    for kind, name in (
        ("participants", dataset.PARTICIPANTS),
        ("credits", dataset.CREDITS),
        ("merchants", dataset.MERCHANTS),
        ("items", dataset.ITEMS),
        ("relationships", dataset.RELATIONSHIPS),
    ):
        command += [f"--{kind}", str(out / name)]
    command += ["--batch-size", str(batch_size), "--rejects", str(out / "rejects.csv")]
    status = subprocess.run(command, env=environment, cwd=dataset.ROOT, stdout=stdout).returncode
    if status not in (0, 1):
        raise RuntimeError(f"load-csv failed with status {status}")
    if environment.get("REDIS_URL"):
        reconcile = [sys.executable, "-m", "authz_server.cli", "reconcile"]
        subprocess.run(reconcile, env=environment, cwd=dataset.ROOT, stdout=stdout, check=True)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.generate_data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--relationships", type=int, default=Options.relationships)
    parser.add_argument("--out", type=Path, default=dataset.DEFAULT_DATA_DIR)
    parser.add_argument("--seed", type=int, default=Options.seed)
    parser.add_argument("--prefix", default=Options.prefix, help="of every id and token")
    parser.add_argument("--hot-families", type=int, default=Options.hot_families)
    parser.add_argument("--hot-quota-fen", type=int, default=Options.hot_quota_fen)
    parser.add_argument(
        "--tokens-file",
        type=Path,
        default=None,
        help="server tokens file to merge the tokens into (default: as the server finds it)",
    )
    parser.add_argument("--batch-size", type=int, default=5000, help="rows per load transaction")
    parser.add_argument("--no-load", action="store_true", help="only write the files")
    arguments = parser.parse_args(argv)
    if arguments.relationships < 1:
        parser.error("--relationships must be positive")
    options = Options(
        relationships=arguments.relationships,
        out=arguments.out,
        seed=arguments.seed,
        prefix=arguments.prefix,
        hot_families=arguments.hot_families,
        hot_quota_fen=arguments.hot_quota_fen,
    )
    summary = generate(options)
    print("\n".join(summary.lines()), flush=True)
    if arguments.no_load:
        return 0
    tokens_file = arguments.tokens_file or dataset.default_tokens_file()
    added = merge_tokens(options.out / dataset.TOKENS, tokens_file)
    print(f"tokens: {added:,} added to {tokens_file} (a running server reads it at start)")
    started = time.monotonic()
    status = load(options.out, batch_size=arguments.batch_size)
    print(
        f"loaded in {time.monotonic() - started:.1f}s"
        + ("" if status == 0 else f"; some rows were rejected: see {options.out / 'rejects.csv'}")
    )
    if not os.environ.get("REDIS_URL"):
        print("REDIS_URL is not set: the server's start-up reconcile gives Redis the new quotas")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
