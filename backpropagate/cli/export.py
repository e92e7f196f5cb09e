"""`backprop export | serve | chat | push | ollama ...`: get a trained model out and run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import typer


def _progress_bar() -> tuple[Any, Any]:
    """A rich progress bar on stderr and the callback that drives it (one task per stage)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description:<9}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    tasks: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    return bar, update


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_cmd(
        source: str | None = typer.Argument(None, help="Run id, run folder, adapter folder or model folder."),
        model: Path | None = typer.Option(
            None,
            "--model",
            help="A Hugging Face model or PEFT adapter folder trained elsewhere (instead of SOURCE).",
        ),
        fmt: str = typer.Option("gguf", "--format", "-f", help="adapter, merged or gguf."),
        quantization: str | None = typer.Option(
            None,
            "--quantization",
            "-q",
            help="gguf: f32 f16 bf16 q8_0 q4_k_m q5_k_m q6_k ...; merged: f32 f16 bf16.",
        ),
        output: Path | None = typer.Option(
            None, "--output", "-o", help="Output folder (default RUN_DIR/exports/)."
        ),
        verify: bool = typer.Option(True, "--verify/--no-verify", help="Compare the GGUF with the HF model."),
        ollama: str | None = typer.Option(
            None, "--ollama", help="Also register the GGUF with Ollama as NAME."
        ),
        base_model: bool = typer.Option(
            False, "--base-model", help="Export the run's base model, without the adapter (gguf only)."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON to stdout."),
    ) -> None:
        """Export a trained run as an adapter, merged weights or a (verified) GGUF."""
        from backpropagate.export.run_export import export_run

        if (source is None) == (model is None):
            print("error: give a SOURCE or --model DIR (one of them)", file=sys.stderr)
            raise typer.Exit(2)
        if model is not None:
            if not model.is_dir():
                print(f"error: --model {model}: no such folder", file=sys.stderr)
                raise typer.Exit(2)
            source = str(model.resolve())

        bar, update = _progress_bar()
        with bar:
            result = export_run(source, fmt, quantization, output, verify, update, ollama, base_model)  # type: ignore[arg-type]
        if as_json:
            print(json.dumps(result.to_dict(), indent=2))
            return
        for note in result.warnings:
            print(f"warning: {note}", file=sys.stderr)
        print(result.path)
        if result.verification:
            v = result.verification
            print(
                f"verified: mean KL {v['mean_kl']:.2e} (limit {v['kl_limit']:g}), "
                f"top-1 agreement {v['top1_agreement']:.1%}",
                file=sys.stderr,
            )
        if result.ollama_model:
            print(
                f"registered with Ollama as {result.ollama_model}: `ollama run {result.ollama_model}`",
                file=sys.stderr,
            )

    @app.command()
    def serve(
        export: str = typer.Argument(..., help="A .gguf file, an export folder or a run id."),
        port: int = typer.Option(8000, "--port", "-p", help="Port (0 picks a free one)."),
        host: str = typer.Option("127.0.0.1", "--host", help="Interface; non-loopback needs --api-key."),
        n_ctx: int = typer.Option(2048, "--ctx", help="Context length."),
        api_key: str | None = typer.Option(
            None, "--api-key", help="Clients must send `Authorization: Bearer KEY` (visible in `ps`)."
        ),
        api_key_file: Path | None = typer.Option(
            None, "--api-key-file", help="Read the API key from this file (mode 600): not visible in `ps`."
        ),
    ) -> None:
        """Serve a GGUF export with an OpenAI-style API (llama_cpp.server)."""
        import signal

        from backpropagate.errors import BackpropError, ErrorCode
        from backpropagate.export.serve import check_server_extra, free_port, resolve_gguf, serve_command
        from backpropagate.server.security.policy import is_loopback

        api_key = _api_key(api_key, api_key_file)
        if not is_loopback(host) and not api_key:
            raise BackpropError(
                ErrorCode.RUNTIME_UI_AUTH_NOT_ENFORCED,
                f"--host {host} (not a loopback address) would let anyone who reaches the port use "
                "the model, and there is no --api-key.",
                hint="Pass --api-key-file FILE (a random key in a mode-600 file, e.g. from "
                "`openssl rand -hex 24`), or serve on 127.0.0.1 and tunnel with `ssh -L`.",
            )
        check_server_extra()
        gguf = resolve_gguf(export)
        port = port or free_port()
        if not api_key:
            print(
                "note: no --api-key-file: every user of this machine can use this server",
                file=sys.stderr,
            )
        print(f"serving {gguf} at http://{host}:{port}/v1 (Ctrl-C stops)", file=sys.stderr)
        command = serve_command(
            gguf, port, host, n_ctx, api_key=api_key, open_access=not api_key, exit_with_parent=True
        )

        def on_term(signum: int, frame: object) -> None:
            raise KeyboardInterrupt  # one cleanup path: the server never outlives this command

        signal.signal(signal.SIGTERM, on_term)
        proc = subprocess.Popen(command)
        try:
            raise typer.Exit(proc.wait())
        except KeyboardInterrupt:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise typer.Exit(proc.wait()) from None

    @app.command()
    def chat(
        export: str | None = typer.Argument(None, help="A .gguf file, an export folder or a run id."),
        url: str | None = typer.Option(
            None, "--url", help="Talk to a running server instead (backprop serve)."
        ),
        system: str | None = typer.Option(None, "--system", help="System prompt."),
        max_tokens: int = typer.Option(256, "--max-tokens", help="Longest reply."),
        api_key: str | None = typer.Option(None, "--api-key", help="The --url server's API key."),
        api_key_file: Path | None = typer.Option(
            None, "--api-key-file", help="Read the --url server's API key from this file."
        ),
    ) -> None:
        """Chat with an export in the terminal; replies stream as they are generated."""
        from backpropagate.errors import BackpropError, ErrorCode

        if not url and not export:
            raise BackpropError(
                ErrorCode.INPUT_REQUEST_INVALID, "give an EXPORT to load or --url of a server"
            )
        history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        stream = _chat_stream(export, url, max_tokens, _api_key(api_key, api_key_file))
        print("type a message; an empty line or Ctrl-D quits", file=sys.stderr)
        while True:
            try:
                text = input("> ")
            except EOFError:
                break
            if not text.strip():
                break
            history.append({"role": "user", "content": text})
            reply = []
            for piece in stream(history):
                reply.append(piece)
                print(piece, end="", flush=True)
            print()
            history.append({"role": "assistant", "content": "".join(reply)})

    @app.command()
    def push(
        path: Path = typer.Argument(..., help="Export folder or file."),
        repo: str = typer.Option(..., "--repo", help="Hub repository, user/name."),
        public: bool = typer.Option(False, "--public", help="Make the repository public (default private)."),
    ) -> None:
        """Upload an export to the Hugging Face Hub (needs HF_TOKEN or `huggingface-cli login`)."""
        from backpropagate.export.push import push as do_push

        print(do_push(path, repo, private=not public))

    ollama_app = typer.Typer(help="Register GGUF exports with a local Ollama daemon.", no_args_is_help=True)
    app.add_typer(ollama_app, name="ollama")

    @ollama_app.command("register")
    def ollama_register(
        export: str = typer.Argument(..., help="A .gguf file, an export folder or a run id."),
        name: str = typer.Option(..., "--name", "-n", help="Model name in Ollama."),
    ) -> None:
        """Upload a GGUF to Ollama and create a model with its chat template."""
        from backpropagate.export.gguf_convert import read_chat_template
        from backpropagate.export.ollama import OllamaClient
        from backpropagate.export.serve import resolve_gguf

        gguf = resolve_gguf(export)
        meta_path = gguf.parent / "export.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        template = meta.get("chat_template") or read_chat_template(gguf.parent)
        OllamaClient().create(name, gguf, template, meta.get("context_length"), meta.get("eos_token"))
        print(f"registered {name}: `ollama run {name}`")

    @ollama_app.command("list")
    def ollama_list(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
        """Models the Ollama daemon has."""
        from backpropagate.export.ollama import OllamaClient

        models = OllamaClient().list()
        if as_json:
            print(json.dumps(models, indent=2))
            return
        for m in models:
            print(f"{m.get('name', m.get('model'))}\t{m.get('size', '')}")

    @ollama_app.command("rm")
    def ollama_rm(name: str = typer.Argument(..., help="Model name.")) -> None:
        """Delete a model from Ollama."""
        from backpropagate.export.ollama import OllamaClient

        OllamaClient().delete(name)
        print(f"deleted {name}")


def _api_key(value: str | None, path: Path | None) -> str | None:
    """The key given on the command line, or read from a private file (refused when others can read it)."""
    if path is None:
        return (value.strip() or None) if value else None
    from backpropagate.errors import BackpropError, ErrorCode
    from backpropagate.server.security.accounts import check_secret_file

    note = check_secret_file(path, "API key file")
    if note:
        print(f"warning: {note}", file=sys.stderr)
    key = path.read_text(encoding="utf-8").strip()
    if not key:
        raise BackpropError(ErrorCode.INPUT_AUTH_INVALID_SHAPE, f"The API key file {path} is empty.")
    return key


def _chat_stream(export: str | None, url: str | None, max_tokens: int, api_key: str | None = None) -> Any:
    """A function history -> iterator of text pieces, over HTTP or with the model loaded here."""
    if url:
        from backpropagate.export.serve import stream_chat

        return lambda history: stream_chat(url, history, max_tokens=max_tokens, api_key=api_key)
    from backpropagate.export.quantize import require_llama_cpp
    from backpropagate.export.serve import resolve_gguf

    require_llama_cpp("chat")
    import llama_cpp

    gguf = resolve_gguf(export or "")
    print(f"chatting with {gguf}", file=sys.stderr)
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=2048, verbose=False)

    def local(history: list[dict[str, str]]) -> Any:
        for chunk in llm.create_chat_completion(messages=history, stream=True, max_tokens=max_tokens):
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                yield piece

    return local
