"""The chat ratings store: durable appends, concurrent writers, rows the trainers accept."""

from __future__ import annotations

import json
import multiprocessing
import threading
from pathlib import Path

import pytest

from backpropagate.data import load_examples
from backpropagate.data.preference import check_objective_fits
from backpropagate.errors import BackpropError
from backpropagate.runs import ratings
from backpropagate.runs.store import Store
from backpropagate.settings import Settings

PROMPT = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is two plus two?"},
]


@pytest.fixture
def home(tmp_path: Path) -> tuple[Store, Settings]:
    settings = Settings(home=tmp_path / "home")
    settings.home.mkdir(parents=True)
    store = Store(settings.database_url)
    store.migrate()
    return store, settings


def _pair(i: int) -> dict:
    return ratings.pair_row(PROMPT, f"Four ({i}).", f"Five ({i}).", "exp-a", "exp-b")


def test_pairs_are_registered_as_an_upload_and_train_dpo(home: tuple[Store, Settings]) -> None:
    store, settings = home
    for i in range(3):
        row = ratings.add_rating(store, settings, "pairs", _pair(i))
    listed = store.list_datasets()
    assert [d.id for d in listed] == [row.id]  # one data set, grown, not one per rating
    assert listed[0].original_name == "chat-ratings.jsonl" and listed[0].rows == 3
    path = Path(listed[0].stored_path)
    assert path.parent == settings.datasets_dir and path.name == f"{row.id}.jsonl"
    assert listed[0].size == path.stat().st_size
    first = json.loads(path.read_text().splitlines()[0])
    assert first["prompt"] == PROMPT and first["chosen_export"] == "exp-a"
    loaded = load_examples(path)
    assert len(loaded.examples) == 3 and loaded.examples[0].kind == "preference"
    assert loaded.examples[0].messages == PROMPT and loaded.examples[0].rejected == "Five (0)."
    for objective in ("dpo", "orpo", "simpo", "kto", "sft"):
        check_objective_fits(objective, loaded.formats)
    assert ratings.summary(store, settings) == {"pairs": {"id": row.id, "rows": 3}}


def test_kto_ratings_go_to_their_own_file_and_train_kto_only(home: tuple[Store, Settings]) -> None:
    store, settings = home
    ratings.add_rating(store, settings, "pairs", _pair(0))
    ratings.add_rating(store, settings, "kto", ratings.kto_row(PROMPT, "Four.", True, "exp-a"))
    row = ratings.add_rating(store, settings, "kto", ratings.kto_row(PROMPT, "Five.", False, "exp-b"))
    assert row.original_name == "chat-ratings-kto.jsonl" and row.rows == 2
    loaded = load_examples(row.stored_path)
    assert [e.desirable for e in loaded.examples] == [True, False]
    check_objective_fits("kto", loaded.formats)
    for objective in ("dpo", "sft"):
        with pytest.raises(BackpropError):
            check_objective_fits(objective, loaded.formats)
    assert set(ratings.summary(store, settings)) == {"pairs", "kto"}


def test_unusable_ratings_are_refused_before_anything_is_written(home: tuple[Store, Settings]) -> None:
    with pytest.raises(BackpropError, match="empty reply"):
        ratings.pair_row(PROMPT, "Four.", "  ", "a", "b")
    with pytest.raises(BackpropError, match="conversation"):
        ratings.kto_row([{"role": "assistant", "content": "x"}], "Four.", True, "a")
    store, settings = home
    assert store.list_datasets() == []


def test_a_torn_last_line_from_a_crash_is_cut_before_the_next_append(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    ratings.append_row(path, {"n": 1})
    with path.open("ab") as fh:
        fh.write(b'{"n": 2, "tor')  # the process died inside its write
    assert ratings.count_rows(path) == 1
    assert ratings.append_row(path, {"n": 3}) == 2
    assert [json.loads(line)["n"] for line in path.read_text().splitlines()] == [1, 3]


def test_threads_appending_at_once_lose_nothing(home: tuple[Store, Settings]) -> None:
    store, settings = home
    barrier = threading.Barrier(4)

    def tab(t: int) -> None:
        barrier.wait()
        for i in range(25):
            ratings.add_rating(store, settings, "pairs", _pair(t * 100 + i))

    threads = [threading.Thread(target=tab, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (dataset,) = store.list_datasets()  # the first ratings of four tabs started one data set
    lines = Path(dataset.stored_path).read_text().splitlines()
    assert len(lines) == 100 and dataset.rows == 100
    assert sorted(json.loads(line)["chosen"] for line in lines) == sorted(
        f"Four ({t * 100 + i})." for t in range(4) for i in range(25)
    )


def _append_many(path: str, who: int, n: int) -> None:
    for i in range(n):
        # A long row: a write of this size still lands whole, never interleaved with another's.
        ratings.append_row(Path(path), {"who": who, "i": i, "pad": "x" * 20000})


def test_processes_appending_to_one_file_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(path), w, 30)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 90
    assert sorted((r["who"], r["i"]) for r in rows) == [(w, i) for w in range(3) for i in range(30)]


def test_the_chat_page_rates_the_marked_columns_latest_reply() -> None:
    from ui_app.state.chat import rating_rows

    left = [*PROMPT, {"role": "assistant", "content": "Four."}]
    right = [*PROMPT[:2], PROMPT[2], {"role": "assistant", "content": "Five.", "error": ""}]
    kind, row = rating_rows("right", left, right, "exp-l", "exp-r")
    assert kind == "pairs" and row["prompt"] == PROMPT
    assert (row["chosen"], row["rejected"], row["chosen_export"], row["rejected_export"]) == (
        "Five.",
        "Four.",
        "exp-r",
        "exp-l",
    )
    kind, row = rating_rows("left", left, [], "exp-l", "none", up=False)
    assert kind == "kto" and row == {
        "prompt": PROMPT,
        "completion": "Four.",
        "label": False,
        "export": "exp-l",
    }
    with pytest.raises(BackpropError, match="empty reply"):  # the model said nothing in one column
        rating_rows("left", left, [*PROMPT, {"role": "assistant", "content": ""}], "a", "b")
    with pytest.raises(BackpropError, match="column"):
        rating_rows("middle", left, right, "a", "b")


def test_an_exchange_with_an_empty_reply_is_left_out_of_later_prompts() -> None:
    from ui_app.state.chat import prompt_of, rating_rows

    chat = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "", "error": "The model ended its reply without any text."},
        {"role": "user", "content": "Hello?"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Two plus two?"},
        {"role": "assistant", "content": "Four."},
    ]
    assert prompt_of(chat[:-1]) == [
        {"role": "user", "content": "Hello?"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Two plus two?"},
    ]
    _, row = rating_rows("left", chat, [*chat[:-1], {"role": "assistant", "content": "Five."}], "a", "b")
    check_objective_fits("dpo", {"x": "preference"})
    from backpropagate.data.formats import normalize

    assert normalize(row, "preference", "x", 1).messages == prompt_of(chat[:-1])


def test_a_row_the_loaders_would_refuse_is_refused_when_rated() -> None:
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]  # two user turns in a row
    with pytest.raises(BackpropError, match="cannot be trained on"):
        ratings.pair_row(bad, "x", "y", "a", "b")
