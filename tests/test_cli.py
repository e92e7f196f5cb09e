import json
import subprocess
import sys


def run_cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "backpropagate", *args], capture_output=True, text=True, **kw
    )


def test_help_lists_commands_without_importing_torch():
    out = run_cli("--help")
    assert out.returncode == 0 and "info" in out.stdout
    probe = "import sys, backpropagate.cli; print(sorted(m for m in ('torch','transformers') if m in sys.modules))"
    assert (
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "[]"
    )


def test_info_json_reports_machine(home):
    out = run_cli("info", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["packages"]["torch"] and data["home"] == str(home)
    assert data["gpus"] == [] or data["gpus"][0]["index"] == 0


def test_usage_error_exits_2():
    assert run_cli("no-such-command").returncode == 2
