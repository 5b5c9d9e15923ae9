"""The quotas a refund batch may credit, locked before its refunds run, in the order every
other writer locks quotas (README "One lock order for quotas"): the settlement lock, then the
relationships by ascending id. The refunds' group commit (group_commit.py, `lock_first`) calls it
once a batch with its refunds' authorization ids."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from authz_server.domain.types import RelationshipStatus
from authz_server.storage.sql import settlement_lock
from authz_server.storage.sql.tables import CapturePartRow, ParticipantRow, RelationshipRow

# Ids in one IN list: a full batch (MAX_BATCH refunds of a few parts each) takes one or two
# statements, far below the bind parameters a statement may have.
REFUND_LOCK_CHUNK = 1_000


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
    figures, under these locks). Each unit calls this again for its own capture before it locks
    the capture row: a capture committed after the batch's read (a refund sent before its
    capture was answered) has its quotas taken then, in the same order, before the capture row
    as another worker's batch takes them. SQLite: nothing to take (the batch's BEGIN IMMEDIATE
    holds the database's write lock)."""
    if session.get_bind().dialect.name != "postgresql":
        return
    # Before the quotas, as a capture batch takes it: after them, it could wait behind a close's
    # exclusive request (one waiting queues the shared ones asked after it) that waits for a
    # capture batch, itself waiting for these quotas.
    settlement_lock.for_writing(session)
    ids = sorted(set(authorization_ids))
    quotas: set[str] = set()
    for start in range(0, len(ids), REFUND_LOCK_CHUNK):
        chunk = ids[start : start + REFUND_LOCK_CHUNK]
        quotas.update(
            session.scalars(
                select(CapturePartRow.relationship_id).where(
                    CapturePartRow.authorization_id.in_(chunk)
                )
            )
        )
    ordered = sorted(quotas)
    # The holders of the quotas no longer active: a refund on one credits the holder's account
    # (an UPDATE of the participant's row), which the units would do in the order they came,
    # so two workers' batches crediting the same two holders deadlocked. Read under the quotas'
    # locks: one active now stays so until this batch commits (a dissolution locks it first).
    holders: set[str] = set()
    for start in range(0, len(ordered), REFUND_LOCK_CHUNK):
        chunk = ordered[start : start + REFUND_LOCK_CHUNK]
        rows = session.execute(
            select(RelationshipRow.holder_id, RelationshipRow.status)
            .where(RelationshipRow.relationship_id.in_(chunk))
            .order_by(RelationshipRow.relationship_id)
            .with_for_update()
        )
        holders.update(h for h, status in rows if status != RelationshipStatus.ACTIVE.value)
    # After the quotas, as every writer takes participants (registry.report_event says so), in
    # Python's order as a proposal takes its two (the column keeps the database's collation).
    people = sorted(holders)
    for start in range(0, len(people), REFUND_LOCK_CHUNK):
        session.execute(
            select(ParticipantRow.participant_id)
            .where(ParticipantRow.participant_id.in_(people[start : start + REFUND_LOCK_CHUNK]))
            .order_by(ParticipantRow.participant_id.collate("C"))
            .with_for_update(key_share=True)
        )
