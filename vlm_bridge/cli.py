"""``vlm-bridge`` command line: import | export | verify | generate | evaluate | finetune | demo.

Exit codes: 0 success; 1 a parity check that ran and failed; 2 a user mistake (bad paths,
unsupported models, layouts that do not divide, corrupt files), with a one-line ``error: ...`` on
stderr; 3 an internal error (a bug), with a one-line ``internal error: ...`` (the traceback with
``VLM_BRIDGE_DEBUG=1``); 130 interrupted by Ctrl-C, 143 stopped by SIGTERM (the output being written
is removed in both cases).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

EXIT_PARITY = 1
EXIT_USAGE = 2
EXIT_CRASH = 3
EXIT_INTERRUPTED = 130


def _add_layout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE models)")


def _add_dtype(p: argparse.ArgumentParser, help_default: str) -> None:
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help=help_default)


def _add_model_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--megatron-path", default=None,
                   help="vlm-bridge checkpoint, or a training run's checkpoints folder (newest iteration)")
    p.add_argument("--hf-model", default=None, help="HF folder, converted in memory")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    # Unset: the model's generation_config.json, as transformers' generate reads it.
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the generation config's max_new_tokens, else 128")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy; default: the generation config's (greedy unless it sets do_sample)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")


def _sampling(args, model_dir: str):
    """The decoding settings: those given, each unset one from the model's generation_config.json
    (as transformers' generate takes them), said on stderr when they sample."""
    from vlm_bridge.inference.command import generation_defaults
    from vlm_bridge.inference.generate import Sampling

    given = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
             "top_k": args.top_k}
    defaults, notes = generation_defaults(model_dir)
    chosen = {k: v if v is not None else defaults[k] for k, v in given.items()}
    from_config = [k for k in ("temperature", "top_p", "top_k") if given[k] is None]
    if chosen["temperature"] > 0 and from_config and defaults["temperature"] > 0:
        notes.insert(0, f"sampling with temperature {chosen['temperature']:g}, top-p {chosen['top_p']:g}, "
                        f"top-k {chosen['top_k']} ({', '.join(k.replace('_', '-') for k in from_config)} "
                        "from generation_config.json; --temperature 0: greedy)")
    if chosen["temperature"] == 0 and (given["top_p"] is not None or given["top_k"] is not None):
        notes.insert(0, "--top-p and --top-k apply only when sampling (a --temperature above 0); "
                        "this decodes greedily")
    args.max_new_tokens = chosen["max_new_tokens"]
    sampling = Sampling(**chosen, seed=args.seed)
    _check_decoding(args.max_new_tokens, args.batch_size)
    sampling.validate()  # a bad value is the one line, without notes
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return sampling


def _check_decoding(max_new_tokens: int, batch_size: int) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")


def _model_source(args) -> str:
    """The folder whose HF config describes the model (checked before any rank starts)."""
    from vlm_bridge.inference.command import resolve_megatron_path

    if bool(args.megatron_path) == bool(args.hf_model):
        raise ValueError("give exactly one of --megatron-path and --hf-model")
    if args.megatron_path:
        return str(resolve_megatron_path(args.megatron_path) / "hf")
    return args.hf_model


class _OneLineErrors(argparse.ArgumentParser):
    """argparse's errors as the command's other user mistakes: one ``error: ...`` line, exit 2
    (argparse prints the whole usage block first)."""

    def error(self, message: str):
        sys.stderr.write(f"error: {self.prog}: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors(prog="vlm-bridge", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import", help="HF checkpoint folder -> Megatron distributed checkpoint")
    p.add_argument("--hf-model", required=True)
    p.add_argument("--megatron-path", required=True)
    _add_layout(p)
    _add_dtype(p, "parameter dtype (default: the checkpoint's)")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("export", help="Megatron checkpoint -> HF folder (safetensors)")
    p.add_argument("--megatron-path", required=True)
    p.add_argument("--hf-path", required=True)
    _add_layout(p)
    _add_dtype(p, "output dtype (default: the checkpoint's)")
    p.add_argument("--max-shard-size-gb", type=float, default=2.0)
    p.add_argument("--expert-layout", choices=["per_expert", "fused_hub", "fused_out_in"],
                   default=None, help="MoE experts on disk (default: as imported)")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("verify", help="compare HF and Megatron logits on the same inputs")
    p.add_argument("--hf-model", required=True)
    p.add_argument("--megatron-path", default=None, help="default: convert --hf-model in memory")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--video", default=None, help="video file or folder of frame images")
    p.add_argument("--prompt", default=None)
    _add_layout(p)
    p.add_argument("--cp", type=int, default=1, help="context-parallel size (sequence split over ranks)")
    _add_dtype(p, "compute dtype (default: fp32 for --hf-model, else the checkpoint's)")
    p.add_argument("--tolerance", type=float, default=None, help="max abs logit diff allowed")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--processor-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="option for the HF processor call, e.g. do_pan_and_scan=true (repeatable)")
    p.add_argument(
        "--fp32-baseline", action="store_true",
        help="half precision: also run HF in fp32 and judge against HF's own half-precision error",
    )

    p = sub.add_parser("generate", help="answer prompts with a Megatron checkpoint (KV-cached decoding)")
    _add_model_source(p)
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--video", default=None, help="video file or folder of frame images")
    p.add_argument("--prompt", default=None, help="one question (streams the answer)")
    p.add_argument("--input", default=None, help="JSONL of chat-schema conversations, one per line")
    p.add_argument("--output", default=None, help="answers as JSONL (with --input)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    _add_sampling(p)
    _add_layout(p)
    _add_dtype(p, "compute dtype (default: the checkpoint's)")

    p = sub.add_parser("evaluate", help="loss, perplexity and scored answers on held-out conversations")
    _add_model_source(p)
    p.add_argument("--data", required=True,
                   help="chat-schema data: a .jsonl/.json file, a data file or dataset folder, jsonl:PATH, "
                        "hf:NAME_OR_DIR or a maker name")
    p.add_argument("--metric", action="append", default=None,
                   help="exact_match, anls or module:function (repeatable; default: exact_match and anls)")
    p.add_argument("--no-generate", action="store_true", help="loss and perplexity only")
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=4096, help="longer samples are truncated as in training")
    p.add_argument("--report", default=None, help="write the JSON report here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --report")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    _add_layout(p)
    _add_dtype(p, "compute dtype (default: the checkpoint's)")

    p = sub.add_parser("finetune", help="fine-tune (SFT or LoRA/DoRA) on Megatron-Core")
    p.add_argument("--recipe", required=True, help="recipe name (an unknown name lists them all)")
    p.add_argument("--pretrained", required=True, help="HF folder or vlm-bridge Megatron checkpoint")
    p.add_argument("--dp", type=int, default=1, help="data-parallel size when not under torchrun")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=2e-5")

    p = sub.add_parser("demo", help="a tiny model: build, import, verify, export, fine-tune")
    p.add_argument("--workdir", default="demo_output")
    p.add_argument("--family", default=None, help="registered family name (default: the demo family)")
    p.add_argument("--no-finetune", action="store_true", help="stop after the conversion steps")
    return parser


def _parallel(args, hf_config_dir=None):
    """The run's layout, refused here (before any rank starts) when the model cannot be split so."""
    from vlm_bridge.parallel import ParallelConfig

    parallel = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep, cp=getattr(args, "cp", 1))
    parallel.validate()
    known = hf_config_dir and os.path.isfile(os.path.join(hf_config_dir, "config.json"))
    if parallel.conversion_world_size > 1 and known:
        import torch

        from vlm_bridge.loading import check_context_parallel, load_hf_config
        from vlm_bridge.registry import family_for_config

        config = load_hf_config(hf_config_dir)
        family = family_for_config(config)
        check_context_parallel(family, parallel)
        family.build_configs(config, torch.float32, parallel.tp, parallel.pp, parallel.ep)
    return parallel


def cmd_import(args) -> int:
    from vlm_bridge.convert.allocator import tune_allocator_for_conversion

    tune_allocator_for_conversion()  # before torch is imported
    from vlm_bridge.loading import import_hf
    from vlm_bridge.parallel import run_parallel

    parallel = _parallel(args, args.hf_model)
    start = time.time()
    meta = run_parallel(
        import_hf, parallel.conversion_world_size, args.hf_model, args.megatron_path, parallel,
        args.dtype, args.overwrite,
    )
    print(f"imported {args.hf_model} -> {args.megatron_path} ({meta.get('family', '?')}, {meta['dtype']}, "
          f"tp={parallel.tp} pp={parallel.pp}) in {time.time() - start:.1f}s")
    _note_unusable_processor(args.hf_model)
    return 0


def _note_unusable_processor(hf_dir: str) -> None:
    """The weights converted, but generate, evaluate and finetune also read the processor (kept in
    the checkpoint's hf/): say now what they would refuse."""
    from vlm_bridge.convert.hf_io import CheckpointError
    from vlm_bridge.loading import load_processor

    try:
        load_processor(hf_dir)
    except (CheckpointError, OSError, ValueError) as exc:
        print(f"note: {exc}; generate, evaluate and finetune read it from the checkpoint's hf/ folder, "
              "so they refuse this checkpoint until it is there", flush=True)


def cmd_export(args) -> int:
    from vlm_bridge.convert.allocator import tune_allocator_for_conversion

    tune_allocator_for_conversion()  # before torch is imported
    from vlm_bridge.loading import export_hf
    from vlm_bridge.parallel import run_parallel

    if not args.max_shard_size_gb > 0:
        raise ValueError(f"--max-shard-size-gb must be positive, got {args.max_shard_size_gb}")
    from vlm_bridge.inference.command import resolve_megatron_path

    # a run folder: its newest step
    megatron_path = str(resolve_megatron_path(args.megatron_path, "run vlm-bridge import on it first"))
    _refuse_checkpoint_parts(args.hf_path, megatron_path)
    parallel = _parallel(args, os.path.join(megatron_path, "hf"))
    start = time.time()
    meta = run_parallel(
        export_hf, parallel.conversion_world_size, megatron_path, args.hf_path, parallel,
        args.dtype, args.overwrite, int(args.max_shard_size_gb * 1024**3), args.expert_layout,
    )
    print(f"exported {megatron_path} -> {args.hf_path} ({meta.get('family', '?')}, {meta['dtype']}) "
          f"in {time.time() - start:.1f}s")
    return 0


def _refuse_checkpoint_parts(output: str, checkpoint: str) -> None:
    """An export into the checkpoint's own ``hf/`` or ``weights/`` would replace what it is read
    from (an ``hf_export`` folder beside them is a normal place for one)."""
    out = Path(output).resolve()
    for part in ("hf", "weights"):
        inside = Path(checkpoint).resolve() / part
        if out == inside or inside in out.parents:
            raise ValueError(f"--hf-path {output} is the checkpoint's own {part}/ folder (part of the input "
                             f"--megatron-path {checkpoint}); choose another output path")


def cmd_verify(args) -> int:
    from vlm_bridge.convert.hf_io import strict_json
    from vlm_bridge.parallel import run_parallel
    from vlm_bridge.verify import DEFAULT_PROMPT, format_report, verify

    if args.tolerance is not None and not 0 <= args.tolerance < math.inf:  # nan fails too
        raise ValueError(f"--tolerance must be a finite number >= 0, got {args.tolerance}")
    megatron_path = args.megatron_path
    if megatron_path:  # a training run folder: its newest checkpoint, as generate and export take
        from vlm_bridge.inference.command import resolve_megatron_path

        megatron_path = str(resolve_megatron_path(megatron_path))
    parallel = _parallel(args, args.hf_model)
    report = run_parallel(
        verify, parallel.conversion_world_size, args.hf_model, megatron_path, parallel,
        args.image, args.video, args.prompt or DEFAULT_PROMPT, args.dtype, args.tolerance,
        args.fp32_baseline, _key_values(args.processor_arg, "--processor-arg"),
    )
    print(strict_json(report, indent=2) if args.json else format_report(report))
    return 0 if report["passed"] else EXIT_PARITY


def cmd_generate(args) -> int:
    from vlm_bridge.convert.hf_io import refuse_existing_file, refuse_output_over_input
    from vlm_bridge.inference.command import generate_command
    from vlm_bridge.inference.requests import check_media, load_requests, request_from_args
    from vlm_bridge.parallel import run_parallel

    if (args.prompt is None) == (args.input is None):  # an empty prompt is one (an image alone)
        raise ValueError("give exactly one of --prompt and --input")
    if args.output:
        refuse_output_over_input(args.output, {"--input": args.input, "--megatron-path": args.megatron_path,
                                               "--hf-model": args.hf_model})
        refuse_existing_file(args.output, "--output", args.overwrite)
    if args.input and (args.image or args.video):
        raise ValueError("--image/--video go with --prompt; with --input the conversations name their media")
    if args.input:
        requests = load_requests(args.input)
    else:
        requests = [request_from_args(args.prompt, args.image, args.video)]
    check_media(requests)
    source = _model_source(args)
    sampling = _sampling(args, source)
    _check_requests(source, requests, args.max_new_tokens)
    parallel = _parallel(args, source)
    result = run_parallel(
        generate_command, parallel.conversion_world_size, args.hf_model, args.megatron_path, parallel,
        requests, sampling, args.batch_size, args.dtype, args.output, args.prompt is not None,
    )
    if not args.input:  # the answer was streamed; say how it ended
        answer = result["answers"][0]
        ending = "stopped at EOS" if answer["finish"] == "stop" else "reached --max-new-tokens"
        print(f"[{answer['tokens']} tokens, {ending}]", file=sys.stderr)
    if args.input:
        done = sum(a["finish"] == "stop" for a in result["answers"])
        where = f" -> {args.output}" if args.output else ""
        print(f"answered {len(result['answers'])} prompts ({done} stopped at EOS){where}")
        if not args.output:
            for answer in result["answers"]:
                print(json.dumps(answer, ensure_ascii=False))
    return 0


def cmd_evaluate(args) -> int:
    from vlm_bridge.convert.hf_io import refuse_existing_file, refuse_output_over_input, strict_json
    from vlm_bridge.data.sources import check_source, refuse_output_over_source, source_path
    from vlm_bridge.inference.evaluate import EvalOptions, evaluate_command, format_report
    from vlm_bridge.inference.metrics import check_metric
    from vlm_bridge.parallel import run_parallel

    data = args.data  # a plain path is read by its kind (see data.sources.bare_path_source)
    check_source(data, "--data")
    if args.report:
        inputs = {"--data": source_path(args.data), "--megatron-path": args.megatron_path,
                  "--hf-model": args.hf_model}
        refuse_output_over_input(args.report, inputs)
        refuse_output_over_source(args.report, "--report", data, "--data")
        refuse_existing_file(args.report, "--report", args.overwrite)
    if args.max_samples is not None and args.max_samples < 1:
        raise ValueError(f"--max-samples must be >= 1, got {args.max_samples}")
    if args.no_generate and args.metric:
        raise ValueError("--metric scores generated answers; --no-generate makes none (drop one of them)")
    metrics = tuple(args.metric or ("exact_match", "anls"))
    for name in metrics:
        check_metric(name)  # a bad name or a failing metric fails before any model loads
    options = EvalOptions(generate=not args.no_generate, metrics=metrics,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                          seq_len=args.seq_len, max_samples=args.max_samples)
    _check_decoding(args.max_new_tokens, args.batch_size)
    parallel = _parallel(args, _model_source(args))
    report = run_parallel(evaluate_command, parallel.conversion_world_size, args.hf_model,
                          args.megatron_path, parallel, data, options, args.dtype, args.report)
    print(strict_json(report, indent=2) if args.json else format_report(report))
    return 0


def _check_requests(hf_config_dir: str, requests, max_new_tokens: int) -> None:
    """A video (or image) for a family that takes none, or more new tokens than the model has
    positions, fails before any model loads."""
    if not os.path.isfile(os.path.join(hf_config_dir, "config.json")):
        return  # the loader says what is wrong with the folder
    from vlm_bridge.data.schema import iter_media
    from vlm_bridge.loading import load_hf_config
    from vlm_bridge.registry import family_for_config

    config = load_hf_config(hf_config_dir)
    positions = getattr(config.get_text_config(), "max_position_embeddings", None)
    if positions and max_new_tokens > positions:
        raise ValueError(f"--max-new-tokens {max_new_tokens} is more than the model's {positions} positions")
    family = family_for_config(config)
    for request in requests:
        for kind, _ in iter_media({"messages": request.messages}):
            if kind not in family.modalities:
                raise ValueError(f"{request.where}: the {family.name} family takes no {kind} input")


def _key_values(pairs: list[str], flag: str) -> dict:
    """``["a=1", "b=true"]`` -> ``{"a": 1, "b": True}`` (JSON values, else the plain string)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {pair!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_finetune(args) -> int:
    from vlm_bridge.parallel import run_parallel
    from vlm_bridge.recipes import get_recipe
    from vlm_bridge.train.config import apply_overrides, check_config
    from vlm_bridge.train.trainer import train

    if args.dp < 1:
        raise ValueError(f"--dp must be >= 1, got {args.dp}")
    given = [o for o in args.overrides if o.split("=", 1)[0] == "pretrained"]
    if given:
        raise ValueError(f"{given[0]}: the model to start from is --pretrained (an HF folder, a vlm-bridge "
                         "checkpoint or a training run); give it there")
    cfg = apply_overrides(get_recipe(args.recipe), args.overrides)
    cfg.pretrained = args.pretrained
    check_config(cfg)
    # Experts are split over data-parallel x context-parallel ranks, so EP needs at least that many.
    world = cfg.parallel.tp * cfg.parallel.pp * max(args.dp * cfg.parallel.cp, cfg.parallel.ep)
    result = run_parallel(train, world, cfg)
    if result["steps"] == result["start_step"]:
        exported = f"; exported it to {result['exported']}" if result.get("exported") else ""
        print(f"nothing to train: {result['output_dir']} already holds step {result['steps']} of "
              f"steps={cfg.steps}{exported}; raise steps to train further")
        return 0
    first, last = result["start_step"] + 1, result["steps"]
    ran = f"{last} steps"
    if first > 1:  # a resumed run: the steps it trained
        ran = f"{f'steps {first}-{last}' if last > first else f'step {last}'} (resumed from step {first - 1})"
    if result.get("skipped_updates"):
        ran += f", {result['skipped_updates']} of them without an update (fp16 overflow)"
    print(f"finished {ran} in {result['seconds']:.0f}s; outputs in "
          f"{result['output_dir']}; data (encoded / skipped by reason): {result['skipped']}")
    return 0


def cmd_demo(args) -> int:
    from vlm_bridge.demo import run_demo
    from vlm_bridge.families import DEMO_FAMILY

    return run_demo(args.workdir, finetune=not args.no_finetune, family_name=args.family or DEMO_FAMILY)


COMMANDS = {"import": cmd_import, "export": cmd_export, "verify": cmd_verify, "generate": cmd_generate,
            "evaluate": cmd_evaluate,
            "finetune": cmd_finetune, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    from vlm_bridge.logging_setup import quiet_third_party_warnings

    quiet_third_party_warnings()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # finetune's key=value overrides may come between its options (argparse takes a positional
    # list only in one run); anything else unknown is an error as argparse would make it
    if args.command == "finetune" and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        hint = ""
        if args.command == "finetune" and any(e.startswith("--") for e in extra):
            flag = next(e for e in extra if e.startswith("--"))
            hint = f"; config settings are key=value overrides (e.g. {flag[2:].replace('-', '_')}=...)"
        sys.stderr.write(f"error: vlm-bridge {args.command}: unrecognized arguments: {' '.join(extra)}{hint} "
                         f"(see vlm-bridge {args.command} --help)\n")
        return EXIT_USAGE
    from vlm_bridge.convert.hf_io import CheckpointError
    from vlm_bridge.parallel import stop_on_signals, stopped_by

    if "WORLD_SIZE" in os.environ and os.environ.get("RANK", "0") != "0":
        # under torchrun every process runs the command: rank 0 prints its result (errors still show)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    stop_on_signals()  # outputs being written are removed on SIGTERM as on Ctrl-C
    user_errors = (CheckpointError, ValueError, FileNotFoundError, OSError)
    try:
        _resolve_model_names(args)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BaseException as exc:  # torch's checkpoint writer wraps a stop in a BaseException of its own
        stopped = stopped_by()
        if stopped is None:
            if not isinstance(exc, Exception):
                raise
            return _report_failure(exc, user_errors)
        print("interrupted" if stopped == signal.SIGINT else "terminated", file=sys.stderr)
        return 128 + stopped


def _resolve_model_names(args) -> None:
    """``--hf-model`` / ``--pretrained`` given as a hub id or a hub cache entry: its snapshot."""
    for option in ("hf_model", "pretrained"):
        value = getattr(args, option, None)
        if value:
            from vlm_bridge.loading import resolve_model_folder

            setattr(args, option, resolve_model_folder(str(value)))


def _report_failure(exc: Exception, user_errors: tuple) -> int:
    """A user mistake as one ``error:`` line (exit 2); anything else is a bug: one line, exit 3."""
    from vlm_bridge.parallel import RankError

    if isinstance(exc, user_errors) or (isinstance(exc, RankError) and exc.user_error):
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE
    if os.environ.get("VLM_BRIDGE_DEBUG") and not isinstance(exc, RankError):
        raise exc
    return _crash(exc)


def _crash(exc: BaseException) -> int:
    text = str(exc).splitlines()[0] if str(exc) else ""
    if not isinstance(exc, RuntimeError) or type(exc).__name__ != "RankError":
        text = f"{type(exc).__name__}: {text}"
    print(f"internal error: {text} (run with VLM_BRIDGE_DEBUG=1 for the traceback)", file=sys.stderr)
    return EXIT_CRASH


if __name__ == "__main__":
    sys.exit(main())
