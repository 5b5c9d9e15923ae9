"""The quotas a refund batch may credit, locked before its refunds run, in the order every
other writer locks quotas (README "One lock order for quotas"): the settlement lock, then the
relationships by ascending id. The refunds' group commit (group_commit.py, `lock_first`) calls it
once a batch with its refunds' authorization ids."""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy import select
from sqlalchemy.orm import Session

from authz_server.domain.types import RelationshipStatus
from authz_server.storage.sql import settlement_lock
from authz_server.storage.sql.tables import CapturePartRow, ParticipantRow, RelationshipRow

# Ids in one IN list: a full batch (MAX_BATCH refunds of a few parts each) takes one or two
# statements, far below the bind parameters a statement may have.
REFUND_LOCK_CHUNK = 1_000
# In the batch's session.info: the authorizations whose quotas the batch's step locked (those
# captured when it read them), so a unit of one of them need not read and lock them again.
LOCKED_BY_BATCH = "refund_quotas_locked"


def lock_refund_quotas(session: Session, authorization_ids: list[str]) -> None:
    """The refunds' group commit's lock_first step (storage/sql/group_commit.py): before a
    batch's refunds run, the quotas they may credit are locked in the order every other writer
    locks them (a capture batch, a put-back settlement, a reconcile): the settlement lock, then
    the relationships by ascending id. A refund goes back last-drawn part first, and a batch's
    refunds come in any order; each locking its quotas as it went, it deadlocked on PostgreSQL
    with those writers and with other workers' batches, and the loser (the refund, answered
    UNAVAILABLE, or the other side) failed after deadlock_timeout. The units then lock the same
    rows again (records.relationship_row: held already, each row refreshed as it is).

    Every part of each capture is locked, refunded in full or not, and for a replay or a refusal
    too: more than a unit may need, never less; then the holders of those quotas no longer
    active (a refund there credits the holder's account), by id. The parts are read without a
    lock: a capture's parts and their quotas never change once written (only their refunded
    figures, under these locks). SQLite: nothing to take (the batch's BEGIN IMMEDIATE holds the
    database's write lock)."""
    session.info[LOCKED_BY_BATCH] = _lock(session, authorization_ids)


def lock_quotas_of_refund(session: Session, authorization_id: str) -> None:
    """A refund unit's own capture's quotas, before its capture row, when the batch's step did
    not lock them: a capture committed after the batch read the parts (a refund sent before its
    capture was answered). Locked in the same order, before the capture row, as another
    worker's batch takes them. Inside the unit's savepoint, so not noted as the batch's: a
    refused unit's rollback lets these locks go."""
    if authorization_id not in session.info.get(LOCKED_BY_BATCH, ()):
        _lock(session, [authorization_id])


def _lock(session: Session, authorization_ids: list[str]) -> set[str]:
    """Locks (PostgreSQL) the quotas of these authorizations' captures and the holders of those
    no longer active; the authorizations found captured."""
    if session.get_bind().dialect.name != "postgresql":
        return set()
    # Before the quotas, as a capture batch takes it: after them, it could wait behind a close's
    # exclusive request (one waiting queues the shared ones asked after it) that waits for a
    # capture batch, itself waiting for these quotas.
    settlement_lock.for_writing(session)
    captured: set[str] = set()
    quotas: set[str] = set()
    for chunk in _chunks(sorted(set(authorization_ids))):
        parts = session.execute(
            select(CapturePartRow.authorization_id, CapturePartRow.relationship_id).where(
                CapturePartRow.authorization_id.in_(chunk)
            )
        )
        for authorization_id, relationship_id in parts:
            captured.add(authorization_id)
            quotas.add(relationship_id)
    # The holders of the quotas no longer active: a refund on one credits the holder's account
    # (an UPDATE of the participant's row), which the units would do in the order they came,
    # so two workers' batches crediting the same two holders deadlocked. Read under the quotas'
    # locks: one active now stays so until this batch commits (a dissolution locks it first).
    holders: set[str] = set()
    for chunk in _chunks(sorted(quotas)):
        rows = session.execute(
            select(RelationshipRow.holder_id, RelationshipRow.status)
            .where(RelationshipRow.relationship_id.in_(chunk))
            .order_by(RelationshipRow.relationship_id)
            .with_for_update()
        )
        holders.update(h for h, status in rows if status != RelationshipStatus.ACTIVE.value)
    # After the quotas, as every writer takes participants (registry.report_event says so), in
    # Python's order as a proposal takes its two (the column keeps the database's collation).
    for chunk in _chunks(sorted(holders)):
        session.execute(
            select(ParticipantRow.participant_id)
            .where(ParticipantRow.participant_id.in_(chunk))
            .order_by(ParticipantRow.participant_id.collate("C"))
            .with_for_update(key_share=True)
        )
    return captured


def _chunks(ids: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(ids), REFUND_LOCK_CHUNK):
        yield ids[start : start + REFUND_LOCK_CHUNK]
