"""``cds-service`` command line: serve, evaluate, check, screening-log, scenarios, harness, demo.

Exit status: 0 done; 1 a check failed (invalid knowledge files, a scenario or harness mismatch);
2 bad input (arguments, files, configuration), always as one line on stderr, never a traceback;
3 the patient data could not be obtained (``evaluate`` with a ``fhirServer``).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from .base.commandline import EXIT_BAD_INPUT, CommandParser, InputError, tcp_port
from .base.config import ConfigError, Settings, load_settings
from .base.datafiles import DataFileError
from .base.errors import HookError

_NCT = re.compile(r"^NCT\d{8}$")


def _settings(args: argparse.Namespace, **overrides: Any) -> Settings:
    extra: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is not None:
            section, name = key.split("__")
            extra.setdefault(section, {})[name] = value
    return load_settings(getattr(args, "config", None), overrides=extra)


def parse_at(text: str | None) -> float | None:
    """An ISO 8601 time with an offset, as a timestamp (argparse type: errors are usage errors)."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO 8601 time: {text!r} (e.g. 2026-11-21T12:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"a time zone offset is needed (e.g. {text}Z): {text!r}")
    return moment.timestamp()


def nct_id(text: str) -> str:
    """argparse type: a ClinicalTrials.gov id, NCT + 8 digits."""
    if not _NCT.match(text):
        raise argparse.ArgumentTypeError(f"not an NCT id (NCT + 8 digits): {text!r}")
    return text


# -- serve ------------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from .serving import serve

    settings = _settings(
        args,
        server__host=args.host,
        server__port=args.port,
        server__workers=args.workers,
        server__threads=args.threads,
    )
    return serve(settings)


# -- evaluate ---------------------------------------------------------------------------------------


_EVALUATE_INPUTS = "a patient-view hook request, a FHIR Bundle of one patient or a scenario file"


def _load_input(path: Path) -> dict[str, Any]:
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not a JSON file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    except orjson.JSONDecodeError as exc:
        raise InputError(f"{path}: not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a JSON {type(data).__name__}, expected an object: {_EVALUATE_INPUTS}")
    return data


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .patient_data.fhir_client import DataUnavailable, FhirClient
    from .patient_data.gather import RawPatientData, gather
    from .patient_data.hook_request import parse_hook_request
    from .screening import Screener

    settings = _settings(args)
    screener = Screener(settings)
    document = _load_input(Path(args.file))
    at = args.at if args.at is not None else time.time()
    if "bundle" in document and "evaluatedAt" in document:
        # A scenario file: its Bundle, evaluated at its own time unless --at says otherwise.
        from .tools.scenarios import ScenarioFileError, load_scenario_file

        try:
            scenario = load_scenario_file(args.file)
        except ScenarioFileError as exc:
            raise InputError(str(exc)) from None
        at = args.at if args.at is not None else scenario.at
        document = scenario.bundle
        print(f"scenario {scenario.name}: expected {scenario.expected}", file=sys.stderr)
    if document.get("resourceType") == "Bundle":
        resources = [e.get("resource") for e in document.get("entry") or [] if isinstance(e, dict)]
        patients = [r for r in resources if isinstance(r, dict) and r.get("resourceType") == "Patient"]
        if len(patients) != 1:
            raise InputError(f"{args.file}: a Bundle must hold exactly one Patient (found {len(patients)})")
        data = RawPatientData(
            patient=patients[0], resources={"bundle": [r for r in resources if r is not patients[0]]}
        )
        patient_id = str(patients[0].get("id", "patient"))
    else:
        try:
            request = parse_hook_request(document, "patient-view")
        except HookError as exc:
            raise InputError(f"{args.file}: not {_EVALUATE_INPUTS}: {exc.diagnostics}") from None
        client = FhirClient(settings.section("fhir")) if request.fhir_server else None
        try:
            data = gather(request, screener.plan, client, settings.section("fhir"), at)
        except DataUnavailable as exc:
            print(f"patient data could not be obtained: {exc.reason}", file=sys.stderr)
            return 3
        patient_id = request.patient_id
    outcome = screener.screen(patient_id, data, at)
    output: dict[str, Any] = {"cards": [card for _, card in screener.cards(outcome)]}
    if args.explain:
        output["evaluation"] = [_explain(result) for result in outcome.results]
        output["unknownCodes"] = dict(outcome.facts.unknown_codes)
        output["unusableValues"] = [u._asdict() for u in outcome.facts.unusable]
        output["skippedResources"] = dict(outcome.facts.skipped)
    sys.stdout.write(orjson.dumps(output, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def _explain(result: Any) -> dict[str, Any]:
    from .base.facts import format_time

    return {
        "trial": result.trial.id,
        "status": result.status,
        "onset": format_time(result.onset.value) if result.onset.value is not None else None,
        "windowOpens": format_time(result.window_opens_at) if result.window_opens_at is not None else None,
        "windowCloses": format_time(result.window_closes_at) if result.window_closes_at is not None else None,
        "criteria": [
            {
                "id": r.criterion.id,
                "kind": r.criterion.kind,
                "status": r.status,
                "evidence": [e.describe() for e in r.evidence],
                **({"missing": list(r.missing)} if r.missing else {}),
            }
            for r in result.results
        ],
    }


# -- check ------------------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    from .knowledge.criteria_language import absence_rules
    from .screening import Screener

    settings = _settings(args)
    screener = Screener(settings)
    knowledge = screener.knowledge
    codes = sum(len(i.codes) for i in knowledge.inputs.values())
    print(
        f"ok: {len(knowledge.inputs)} observation inputs ({codes} codes), {len(knowledge.drugs)} drugs, "
        f"{len(knowledge.value_sets)} condition value sets, {len(screener.trials)} trials "
        f"({', '.join(t.id for t in screener.trials)}), card templates — from {settings.data_dir}"
    )
    # Rules whose missing data counts as "not met": each carries its clinical reason (checked at
    # load time), listed so that a reviewer sees every place where absence decides.
    absent = [
        (trial.id, criterion.id, spec)
        for trial in screener.trials
        for criterion in trial.criteria
        if criterion.rule is not None
        for _, spec in absence_rules(criterion.rule)
    ]
    print(f'{len(absent)} rule(s) where missing data counts as "not met", each with its reason:')
    for trial_id, criterion_id, spec in absent:
        what = spec.get("input") or ", ".join(spec.get("value_sets", ()))
        print(f"  {trial_id} {criterion_id} ({what}): {spec.get('absent_reason', '(no reason!)')}")
    return 0


# -- screening log ----------------------------------------------------------------------------------


def cmd_screening_log(args: argparse.Namespace) -> int:
    """CSV of every card issued (one row each) with its latest feedback: docs/cards.md, "Screening log"."""
    from .store import export_screening_csv, open_store

    settings = _settings(args)
    trials = set(args.trial or [])
    known: set[str] = set()
    if trials:
        # Known: every trial file of the data folder (screened now or not).
        from .knowledge.mappings import load_knowledge
        from .knowledge.trials import load_trials

        known = {t.id for t in load_trials(settings.data_dir, load_knowledge(settings.data_dir))}
    store = open_store(settings.section("store")["url"])
    try:
        # A trial no longer in trials/ may still be in the log: unknown only when in neither.
        unknown = sorted(t for t in trials - known if not store.screening_log(trial_id=t))
        if unknown:
            raise InputError(
                f"--trial {', '.join(unknown)}: no such trial in {settings.data_dir / 'trials'} "
                f"nor in the screening log (known: {', '.join(sorted(known))})"
            )
        rows = store.screening_log(
            since=args.since, trial_id=next(iter(trials)) if len(trials) == 1 else None
        )
        count = export_screening_csv([r for r in rows if not trials or r.trial_id in trials], sys.stdout)
    finally:
        store.close()
    print(f"cds-service: {count} screening-log rows — they hold patient identifiers", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="cds-service",
        description=__doc__.split("\n\n")[0].replace("``", "`"),
        epilog=__doc__.split("\n\n")[1].replace("\n", " ").replace("``", "`"),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_config(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config", help="YAML configuration file (default: $CDS_CONFIG or the embedded defaults)"
        )

    serve = sub.add_parser(
        "serve", help="run the production server (gunicorn gthread, docs/deploy.md) in the foreground"
    )
    serve.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=tcp_port, default=None, help="port (default 8080)")
    serve.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")
    serve.add_argument("--threads", type=int, default=None, help="threads per worker (default 16)")
    add_config(serve)
    serve.set_defaults(func=cmd_serve)

    evaluate = sub.add_parser(
        "evaluate", help="print the cards for a hook request JSON, a FHIR Bundle or a scenario file"
    )
    evaluate.add_argument("file")
    evaluate.add_argument("--at", type=parse_at, default=None, help="evaluation time, ISO 8601 with offset")
    evaluate.add_argument(
        "--explain",
        action="store_true",
        help="also print every trial's criteria results, unknown codes and unusable values",
    )
    add_config(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    check = sub.add_parser("check", help="validate every mapping, trial and card file")
    add_config(check)
    check.set_defaults(func=cmd_check)

    log = sub.add_parser("screening-log", help="export the screening log as CSV (holds patient identifiers)")
    log.add_argument(
        "--since",
        type=parse_at,
        default=None,
        help="only cards issued since this time (ISO 8601 with offset)",
    )
    log.add_argument(
        "--trial",
        action="append",
        type=nct_id,
        metavar="NCT",
        help="only this trial (NCT id); repeat for several",
    )
    add_config(log)
    log.set_defaults(func=cmd_screening_log)
    # Subcommands defined next to the code they drive (each module has `register(subparsers)`):
    from .tools.scenarios import register as register_scenarios

    register_scenarios(sub)
    from .tools import demo, harness

    harness.register(sub)
    demo.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"cds-service {args.command}"
    try:
        return int(args.func(args))
    except DataFileError as exc:  # the knowledge files are invalid: what `check` is for
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except (ConfigError, InputError) as exc:
        print(f"{prog}: {' '.join(str(exc).split())}", file=sys.stderr)  # one line, whatever the message
        return EXIT_BAD_INPUT
    except OSError as exc:  # e.g. a folder that cannot be written
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{prog}: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
