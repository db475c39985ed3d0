"""The job store contract on both backends (SQLite and a throw-away PostgreSQL 15 cluster), and what replicas need of
it: disjoint concurrent claims, leases that expire and are taken over (not before), a capacity check that holds over
replicas, recovery that leaves other replicas' live jobs alone.

Two store objects on the same database stand for two replicas. The PostgreSQL cases are skipped when PostgreSQL is
not installed.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from server.errors import ApiError
from server.jobs.store import LEASE_REASON, MAX_ATTEMPTS, RESTART_REASON, Job, JobStore, JobStoreBase

Opener = Callable[[], JobStoreBase]
BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """Opens one more store (one more replica) on the same fresh database; all are closed after the test."""
    opened: list[JobStoreBase] = []
    if request.param == "sqlite":
        path = tmp_path / "jobs.sqlite3"

        def make() -> JobStoreBase:
            opened.append(JobStore(path))
            return opened[-1]
    else:
        url = request.getfixturevalue("pg_url")
        from server.jobs.pg_store import PgJobStore

        def make() -> JobStoreBase:
            opened.append(PgJobStore(url))
            return opened[-1]

    request.addfinalizer(lambda: [s.close() for s in opened])
    return make


def job(n: int, state: str = "queued", attempts: int = 0, created: float | None = None) -> Job:
    job_id = f"{n:032x}"
    return Job(
        id=job_id,
        model="tiny",
        model_dir="tiny",
        state=state,
        progress=0.0,
        output="nifti",
        tta=n % 2 == 0,
        stem="case",
        created=created if created is not None else 1_700_000_000.123456 + n,
        started=None,
        finished=None,
        attempts=attempts,
        error=None,
        input_path=f"{job_id}/input.nii.gz",
        result_path=None,
        label_names=None,
    )


def test_contract_capacity_claim_order_lease_and_guards(open_store: Opener) -> None:
    store = open_store()
    for n in (1, 2, 3):
        assert store.insert_if_room(job(n), max_active=3)
    assert not store.insert_if_room(job(4), max_active=3)  # full: queued + running count
    assert store.active_count() == 3 and store.get(job(4).id) is None
    assert store.get(job(1).id) == job(1)  # every field round-trips (times to the microsecond, tta as a bool)

    before = time.time()
    first = store.claim("a", 30.0)
    assert first is not None and first.id == job(1).id  # oldest first
    assert (first.state, first.attempts, first.lease_owner, first.progress) == ("running", 1, "a", 0.0)
    assert first.lease_expires is not None and before + 25 < first.lease_expires < time.time() + 35
    assert first.started is not None and first.started >= before - 1

    assert store.renew(first.id, "a", 30.0, progress=0.5)
    assert store.get(first.id).progress == 0.5  # type: ignore[union-attr]
    assert not store.renew(first.id, "b", 30.0)  # not b's lease
    assert not store.finish(first.id, "b", state="done")
    assert store.finish(first.id, "a", state="done", result_path=f"{first.id}/result.nii.gz", finished=time.time())
    assert not store.finish(first.id, "a", state="failed")  # a done job stays done
    assert not store.renew(first.id, "a", 30.0)
    done = store.get(first.id)
    assert done is not None and done.state == "done" and done.lease_expires is None
    assert done.result_path == f"{first.id}/result.nii.gz"
    assert done.status()["result_url"] == f"/v1/jobs/{first.id}/result"

    assert store.transition(job(2).id, "queued", state="cancelled", finished=time.time())
    assert not store.transition(job(2).id, "queued", state="running")  # guarded
    third = store.claim("a", 30.0)
    assert third is not None and third.id == job(3).id  # the cancelled one is skipped
    assert store.claim("a", 30.0) is None

    assert store.release(third.id, "a")  # graceful stop: back to the queue, the attempt does not count
    again = store.get(third.id)
    assert again is not None and (again.state, again.attempts, again.lease_owner) == ("queued", 0, None)
    store.delete(third.id)
    assert store.get(third.id) is None and store.active_count() == 0


def test_expired_lease_is_claimed_by_the_other_replica_after_the_lease_not_before(open_store: Opener) -> None:
    a, b = open_store(), open_store()
    assert a.insert_if_room(job(1), max_active=5)
    lease = 0.6
    claimed = a.claim("a", lease)  # then replica a is "killed": it never renews
    assert claimed is not None
    assert b.claim("b", lease) is None  # the lease is live
    assert b.recover("b") == (0, 0)  # b starting up leaves a's live job alone
    time.sleep(lease + 0.3)
    taken = b.claim("b", lease)
    assert taken is not None and taken.id == claimed.id
    assert (taken.attempts, taken.lease_owner) == (2, "b")
    assert not a.renew(claimed.id, "a", lease)  # a, if it comes back, learns it lost the job...
    assert not a.finish(claimed.id, "a", state="done")  # ...and cannot overwrite b's outcome
    time.sleep(lease + 0.3)  # b dies too: the job had MAX_ATTEMPTS starts, so it fails instead of a third claim
    assert MAX_ATTEMPTS == 2
    assert a.claim("a", lease) is None
    failed = a.get(claimed.id)
    assert failed is not None and failed.state == "failed" and failed.error == LEASE_REASON


def test_recover_takes_back_own_ownerless_and_expired_leases_only(open_store: Opener) -> None:
    store = open_store()
    for n in range(1, 6):
        assert store.insert_if_room(job(n), max_active=10)
    ids = [store.claim(owner, 60.0).id for owner in ("a", "b", "b", "c")]  # type: ignore[union-attr]
    store.add_attempts(ids[2], 1)  # b's second job was already retried once
    assert store.insert_if_room(job(9, state="running", attempts=1), max_active=10)  # a row from before leases
    assert store.claim("c", 0.01) is not None and store.renew(job(5).id, "c", 0.01)
    time.sleep(0.1)  # c's second lease has expired
    restarted = open_store()  # replica b restarts under the same replica id
    assert restarted.recover("b") == (3, 1)  # b's first job, the lease-less row, c's expired job; b's retried one fails
    states = {i: restarted.get(i) for i in [*ids, job(9).id, job(5).id]}
    assert states[ids[0]].lease_owner == "a" and states[ids[0]].state == "running"  # type: ignore[union-attr]
    assert states[ids[3]].lease_owner == "c" and states[ids[3]].state == "running"  # type: ignore[union-attr]
    assert states[ids[1]].state == "queued" and states[ids[1]].lease_owner is None  # type: ignore[union-attr]
    assert states[ids[2]].state == "failed" and states[ids[2]].error == RESTART_REASON  # type: ignore[union-attr]
    assert states[job(9).id].state == "queued" and states[job(5).id].state == "queued"  # type: ignore[union-attr]


def test_two_replicas_claim_disjoint_jobs_concurrently(open_store: Opener) -> None:
    stores = {"a": open_store(), "b": open_store()}
    total = 40
    for n in range(total):
        assert stores["a"].insert_if_room(job(n), max_active=total)
    claimed: dict[str, list[str]] = {"a-0": [], "a-1": [], "b-0": [], "b-1": []}
    start = threading.Barrier(len(claimed))

    def drain(name: str) -> None:
        owner, store = name[0], stores[name[0]]
        start.wait()
        while (got := store.claim(owner, 30.0)) is not None:
            claimed[name].append(got.id)
            time.sleep(0.005)  # the job's work, outside the store
            assert store.finish(got.id, owner, state="done", finished=time.time())

    threads = [threading.Thread(target=drain, args=(name,)) for name in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    everything = [i for ids in claimed.values() for i in ids]
    assert len(everything) == total and len(set(everything)) == total  # each job exactly once
    assert claimed["a-0"] + claimed["a-1"] and claimed["b-0"] + claimed["b-1"]  # both replicas took work
    assert stores["b"].active_count() == 0


def test_capacity_holds_over_replicas_inserting_at_once(open_store: Opener) -> None:
    stores = [open_store() for _ in range(4)]  # four replicas, one submitting thread each
    for attempt in range(5):  # a lost race is timing-dependent: race a few times
        accepted: list[bool] = []
        start = threading.Barrier(len(stores))

        def submit(k: int, attempt: int = attempt, accepted: list[bool] = accepted, start=start) -> None:
            start.wait()
            for n in range(6):
                accepted.append(stores[k].insert_if_room(job(10_000 * attempt + 100 * k + n), max_active=6))

        threads = [threading.Thread(target=submit, args=(k,)) for k in range(len(stores))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sum(accepted) == 6 and stores[0].active_count() == 6, f"attempt {attempt}"
        for k in range(len(stores)):
            for n in range(6):
                stores[0].delete(job(10_000 * attempt + 100 * k + n).id)


def test_sqlite_file_from_before_leases_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    db = sqlite3.connect(path)
    columns = ", ".join(
        f"{name} TEXT" for name in ("id", "model", "model_dir", "state", "output", "stem", "input_path", "error")
    )
    db.execute(
        f"CREATE TABLE jobs ({columns}, progress REAL, tta INTEGER, created REAL, started REAL, finished REAL, "
        "attempts INTEGER, result_path TEXT, label_names TEXT)"
    )
    db.execute(
        "INSERT INTO jobs VALUES ('x', 'tiny', '/m/tiny', 'running', 'nifti', 'case', '/d/jobs/x/input.nii.gz', NULL,"
        " 0.5, NULL, 1.0, 2.0, NULL, 1, NULL, NULL)"
    )
    db.commit()
    db.close()
    store = JobStore(path)
    assert store.recover("host") == (1, 0)
    claimed = store.claim("host", 30.0)
    assert claimed is not None and claimed.id == "x" and claimed.lease_owner == "host" and claimed.attempts == 2
    store.close()


def test_unreachable_postgres_is_a_503(postgres: object) -> None:
    from server.jobs.pg_store import PgJobStore
    from tests.server.pg import _free_port

    with pytest.raises(ApiError) as err:
        PgJobStore(f"postgresql://medseg:secret-password@127.0.0.1:{_free_port()}/medseg")
    assert err.value.status == 503 and err.value.headers == {"Retry-After": "5"}
    assert "secret-password" not in str(err.value.detail) + str(err.value.hint)
