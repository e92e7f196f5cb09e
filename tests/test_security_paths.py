"""safe_path keeps request paths inside their base folders; check_output_dir refuses system folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.server.security.paths import check_output_dir, safe_path


def test_security_safe_path_inside_base(tmp_path: Path) -> None:
    base = tmp_path / "datasets"
    (base / "a").mkdir(parents=True)
    assert safe_path("a/x.jsonl", base) == (base / "a" / "x.jsonl").resolve()
    assert safe_path(base / "a", base) == (base / "a").resolve()
    assert safe_path("a/../b.csv", base) == (base / "b.csv").resolve()


@pytest.mark.parametrize("bad", ["../secret", "a/../../secret", "/etc/passwd", "nul\x00byte"])
def test_security_safe_path_refuses_escape(tmp_path: Path, bad: str) -> None:
    base = tmp_path / "datasets"
    (base / "a").mkdir(parents=True)
    with pytest.raises(BackpropError) as exc:
        safe_path(bad, base)
    assert exc.value.code == ErrorCode.INPUT_PATH_TRAVERSAL


def test_security_safe_path_follows_symlinks(tmp_path: Path) -> None:
    base, outside = tmp_path / "base", tmp_path / "outside"
    base.mkdir()
    outside.mkdir()
    (outside / "loot.txt").write_text("x")
    (base / "link").symlink_to(outside)
    with pytest.raises(BackpropError):
        safe_path("link/loot.txt", base)
    # A second base makes the same target legitimate.
    assert safe_path("link/loot.txt", base, outside) == (outside / "loot.txt").resolve()


def test_security_safe_path_prefix_sibling_is_outside(tmp_path: Path) -> None:
    # "/x/data-evil" starts with the string "/x/data" but is not inside it.
    (tmp_path / "data").mkdir()
    (tmp_path / "data-evil").mkdir()
    with pytest.raises(BackpropError):
        safe_path(tmp_path / "data-evil" / "f", tmp_path / "data")


@pytest.mark.parametrize(
    "bad", ["/", "/etc", "/etc/cron.d", "/usr/local/x", "/proc/self", "/var/lib/x", "/dev"]
)
def test_security_output_dir_refuses_system_folders(bad: str) -> None:
    with pytest.raises(BackpropError) as exc:
        check_output_dir(bad)
    assert exc.value.code == ErrorCode.UI_OUTPUT_DIR_FORBIDDEN


@pytest.mark.parametrize("sub", [".ssh", ".aws/creds", ".gnupg", ".config/x", ".cache/huggingface"])
def test_security_output_dir_refuses_credential_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sub: str
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(BackpropError) as exc:
        check_output_dir(Path.home() / sub)
    assert exc.value.code == ErrorCode.UI_OUTPUT_DIR_FORBIDDEN


def test_security_output_dir_allows_ordinary_folders(tmp_path: Path) -> None:
    assert check_output_dir(tmp_path / "runs" / "out") == (tmp_path / "runs" / "out").resolve()
    assert check_output_dir(Path.home() / "models-out") == (Path.home() / "models-out").resolve()


def test_security_output_dir_symlink_into_system_refused(tmp_path: Path) -> None:
    (tmp_path / "sneaky").symlink_to("/etc")
    with pytest.raises(BackpropError):
        check_output_dir(tmp_path / "sneaky" / "out")


@pytest.mark.parametrize(
    "secret", [".ssh/id_ed25519", ".aws/credentials", ".cache/huggingface/token", ".netrc"]
)
def test_security_safe_path_refuses_credentials_inside_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, secret: str
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(BackpropError) as exc:
        safe_path(home / secret, home)
    assert exc.value.code == ErrorCode.INPUT_PATH_TRAVERSAL and "credential" in exc.value.message
    # The rest of the home folder, including the model cache, stays usable.
    assert safe_path(home / ".cache/huggingface/hub/models--x/config.json", home).name == "config.json"
    assert safe_path(home / "data/train.jsonl", home).name == "train.jsonl"
