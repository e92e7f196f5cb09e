import threading

from backpropagate.events import Checkpoint, EventLog, Status, Step, parse_event, read_events


def _step(i):
    return Step(step=i, total_steps=10, epoch=0.1 * i, loss=1.0 / i, lr=1e-4)


def test_log_stamps_gapless_seq_and_round_trips(tmp_path):
    with EventLog(tmp_path / "events.jsonl", "run1") as log:
        first = log.append(Status(status="running"))
        for i in range(1, 4):
            log.append(_step(i))
        log.append(Checkpoint(step=3, path="checkpoints/step-000003", bytes=10))
    assert first.seq == 1 and first.run_id == "run1" and first.ts > 0
    got = list(read_events(tmp_path / "events.jsonl"))
    assert [e.seq for e in got] == [1, 2, 3, 4, 5]
    assert [e.type for e in got] == ["status", "step", "step", "step", "checkpoint"]
    assert [e.seq for e in read_events(tmp_path / "events.jsonl", after=3)] == [4, 5]
    assert parse_event(got[1].model_dump_json()) == got[1]


def test_reopen_continues_numbering_and_drops_torn_line(tmp_path):
    path = tmp_path / "events.jsonl"
    with EventLog(path, "r") as log:
        log.append(_step(1))
    with path.open("ab") as fh:
        fh.write(b'{"v":1,"type":"st')  # a crash in the middle of a write
    assert [e.seq for e in read_events(path)] == [1]
    with EventLog(path, "r") as log:
        assert log.append(_step(2)).seq == 2
    assert [e.seq for e in read_events(path)] == [1, 2]


def test_concurrent_writers_never_duplicate_seq(tmp_path):
    log = EventLog(tmp_path / "events.jsonl", "r")
    threads = [threading.Thread(target=lambda: [log.append(_step(1)) for _ in range(50)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    assert [e.seq for e in read_events(tmp_path / "events.jsonl")] == list(range(1, 201))
