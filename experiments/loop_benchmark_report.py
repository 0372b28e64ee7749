"""The loop benchmark's report (``configs/experiments/loop_benchmark.yaml``, ``cpu_speed.yaml``): one table per
loop configuration (data, step and end-to-end img/s, their ratios, step-time scaling, MFU, host syncs), then
the single measurements (host overhead, KoLeo-proto on the device, the peer step, neighbour churn), from the
records of the run kinds of :mod:`experiments.loop_benchmark`, ``step_vs_peer`` and ``neighbour_churn`` only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from experiments.loop_benchmark import SYNC_DEBUG_NOTICE
from experiments.markdown import distinct, markdown_table, report_outputs, write_generated
from experiments.neighbour_churn import DEFAULT_CANDIDATES, DEFAULT_REFRESH_DTYPE

# (header, key, format) of the loop table's columns that show a row's value as it is
LOOP_COLUMNS = (
    ("batch", "batch_size", ""),
    ("data img/s", "data_images_per_second", ",.0f"),
    ("step ms", "step_ms", ".1f"),
    ("step img/s", "step_images_per_second", ",.0f"),
    ("end-to-end img/s", "end_to_end_images_per_second", ",.0f"),
    ("data ÷ step", "data_over_step", ".2f"),
    ("end-to-end ÷ step", "end_to_end_over_step", ".2f"),
)


def _loop_row(row: dict[str, Any]) -> list[str]:
    scaling = row.get("step_time_ratio_to_previous")
    dtype = row.get("machine_matmul_dtype", "float32")  # older records measured in float32 only
    found = [sync for sync in row["host_syncs"] if not sync.startswith(SYNC_DEBUG_NOTICE)]  # records before the fix
    return [
        *(format(row[key], fmt) for _, key, fmt in LOOP_COLUMNS),
        f"{scaling:.2f}x for {row['batch_ratio_to_previous']:g}x batch" if scaling else "–",
        f"{row['achieved_gflops']:.0f} of {row['machine_matmul_gflops']:.0f} {dtype} ({100 * row['mfu']:.0f} %)",
        "; ".join(found)[:120] if found else "none",
    ]


def render_loop_markdown(name: str, loop: dict[str, Any]) -> list[str]:
    """One loop configuration's heading, command and table (a loop of :func:`_loop_tables`)."""
    header = [label for label, _, _ in LOOP_COLUMNS]
    header += ["step time vs previous batch", "matmul GFLOP/s (MFU)", "host syncs"]
    rows = [
        [str(row["batch_size"]), f"failed: {row['error'][:100]}", *["–"] * (len(header) - 2)]
        if "error" in row
        else _loop_row(row)
        for row in loop["rows"]
    ]
    return [f"### {name} ({loop['device']})", "", f"`{' '.join(loop['argv'])}`", "", *markdown_table(header, rows), ""]


def _loop_tables(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Loop records grouped by config (in plan order), with step-time scaling between consecutive batches."""
    loops: dict[str, dict[str, Any]] = {}
    for record in records:
        if record["kind"] != "loop_batch":
            continue
        name = record["params"].get("title", record["axes"].get("config", record["stage"]))
        loop = loops.setdefault(
            name, {"argv": record["params"]["argv"], "device": record["environment"]["device"], "rows": []}
        )
        if record["status"] == "done":
            loop["rows"].append(dict(record["result"]))  # a copy: the scaling below is added to it
        else:
            loop["rows"].append({"batch_size": record["params"]["batch_size"], "error": record["error"]})
    for loop in loops.values():
        measured = [row for row in loop["rows"] if "error" not in row]
        for smaller, larger in zip(measured, measured[1:]):
            larger["step_time_ratio_to_previous"] = larger["step_ms"] / smaller["step_ms"]
            larger["batch_ratio_to_previous"] = larger["batch_size"] / smaller["batch_size"]
    return loops


def load_results(records: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"device", "loops": {config: table}, "overhead", "koleo_proto", "peer", "peer_compiled"}`` from the
    suite's records."""
    single = {"host_overhead": "overhead", "koleo_on_device": "koleo_proto", "step_vs_peer": "peer"}
    devices = distinct((record["environment"]["device"] for record in records), "-")
    results: dict[str, Any] = {"device": devices, "loops": _loop_tables(records)}
    for record in records:
        if record["kind"] in single:
            done = record["status"] == "done"
            key = single[record["kind"]] + ("_compiled" if record["params"].get("compile") else "")
            results[key] = record["result"] if done else {"error": record["error"]}
        elif record["kind"] == "neighbour_churn" and record["status"] == "done":
            results.setdefault("churn", {})[record["name"]] = record["result"]["final"]
            for row in record["result"].get("candidate_search", []):
                results.setdefault("candidate_search", []).append({"run": record["name"], **row})
    return results


def churn_table(churn: dict[str, dict[str, Any]]) -> list[str]:
    """KoLeo-proto's neighbour churn: per run and lag, the nearest neighbour kept, and found among the
    m nearest of that many steps before; one table per set of m (runs measure different ones)."""
    tables: dict[tuple[int, ...], list[list[str]]] = {}
    for name, final in churn.items():
        lags = sorted({int(key.split("@")[1]) for key in final if key.startswith("same_nn@")})
        ms = tuple(sorted({int(key[len("in_top") :].split("@")[0]) for key in final if key.startswith("in_top")}))
        for lag in lags:
            cells = [f"{100 * final[f'in_top{m}@{lag}']:.2f} %" for m in ms]
            row = [name, f"{final['step']}", f"{lag}", f"{100 * final[f'same_nn@{lag}']:.1f} %", *cells]
            tables.setdefault(ms, []).append(row)
    header = ["run", "at step", "lag (steps)", "same nearest neighbour"]
    lines: list[str] = []
    for ms, rows in tables.items():
        table = markdown_table([*header, *[f"nearest among the {m} nearest then" for m in ms]], rows)
        lines += [*([""] if lines else []), *table]
    return lines


def candidate_search_table(rows: list[dict[str, Any]]) -> list[str]:
    """The candidate search beside the exact one over a real run: per refresh period and setting,
    how often its choice was the exact neighbour, how often it was certified, and its costs (a choice,
    an update of the lists between refreshes)."""
    cells = [
        [
            row["run"],
            str(row["period"]),
            row["setting"],
            f"{100 * row['exact_mean']:.2f} %",
            f"{100 * row['exact_min']:.2f} %",
            f"{100 * row['certified_mean']:.1f} %",
            f"{row['choose_ms']:.1f}",
            f"{row['update_ms']:.1f}" if "update_ms" in row else "-",
        ]
        for row in rows
    ]
    header = ["run", "refresh every (steps)", "setting", "exact (mean)", "exact (lowest step)", "certified (mean)"]
    return markdown_table([*header, "choice ms", "update ms"], cells)


def write_report(spec, records: list[dict[str, Any]], left_out: dict[str, str], report_dir: Path) -> list[Path]:
    """One table per config, then the single measurements: the whole ``outputs.markdown`` (default
    ``<spec name>.md``), or with ``outputs.region`` only that generated region of it."""
    outputs = report_outputs(spec, report_dir)
    path = report_dir / outputs["markdown"]
    loads = sorted({tuple(record["environment"].get("load_average") or ()) for record in records})
    text = render_records(records, spec.settings.get("title"))
    if loads:
        text += "\nLoad average (1, 5, 15 min) when each run ended: " + "; ".join(map(str, loads)) + ".\n"
    if outputs.get("region"):
        write_generated(path, {outputs["region"]: text.splitlines()})
    else:
        path.write_text(text)
    return [path]


def _overhead_sentence(overhead: dict[str, Any]) -> str:
    return (
        f"Host overhead (`{' '.join(overhead['argv'][:4])}` with the model shrunk to width 8, batch "
        f"{overhead['batch_size']}: every op kept, no work): data {overhead['data_ms']:.1f} ms "
        f"({overhead['data_ops']:,} ATen ops), step {overhead['step_ms']:.1f} ms ({overhead['step_ops']:,} ops): "
        "the floor under the step time at any batch."
    )


def _koleo_sentence(koleo: dict[str, Any]) -> str:
    memory = " (no GPU memory)." if math.isnan(koleo["peak_mib"]) else f", peak {koleo['peak_mib']:.0f} MiB."
    return (
        f"KoLeo-proto forward + backward, K = {koleo['num_prototypes']:,}, d = {koleo['dim']}: {koleo['ms']:.1f} ms"
        + memory
    )


def _peer_sentence(peer: dict[str, Any]) -> str:
    compiled = ", both torch.compile'd" if peer.get("compiled") else ""
    return (
        f"Full DINO step against the lightly-based peer on {peer['device']}{compiled} (batch {peer['batch']}, "
        f"K = {peer['K']:,}, {peer['n_local']} local crops, same fused AdamW, both teachers batched): ours "
        f"{peer['ours_images_per_second']:,.0f} img/s, lightly {peer['lightly_images_per_second']:,.0f} img/s, "
        f"median per-round speed-up {peer['speedup_median']:.2f}x."
    )


# (results key, label when it failed, the sentence when it was measured)
_SENTENCES = (
    ("overhead", "Host overhead", _overhead_sentence),
    ("koleo_proto", "KoLeo-proto at large K", _koleo_sentence),
    ("peer", "Peer step", _peer_sentence),
    ("peer_compiled", "Peer step, both compiled,", _peer_sentence),
)


def render_records(records: list[dict[str, Any]], title: str | None = None) -> str:
    """:func:`render_loop_suite_markdown` of the records, naming the commands that made them."""
    commands = distinct((record["environment"].get("command", "?") for record in records), "-")
    return render_loop_suite_markdown(load_results(records), commands, title)


def render_loop_suite_markdown(results: dict[str, Any], command: str, title: str | None = None) -> str:
    lines = [
        f"## {title or 'Training loop on the accelerator'}",
        "",
        f"Measured on {results['device']} with `{command}`.",
        "",
    ]
    for name, loop in results["loops"].items():
        lines += render_loop_markdown(name, loop)
    for key, label, sentence in _SENTENCES:
        result = results.get(key)
        if result:
            lines += [f"{label} **failed**: {result['error']}" if "error" in result else sentence(result), ""]
    if results.get("churn"):
        lines += [
            "KoLeo-proto's nearest neighbours over a real run (exact search):",
            "",
            *churn_table(results["churn"]),
            "",
        ]
    if results.get("candidate_search"):
        lists = distinct(  # records made before the lists were recorded ran the defaults
            f"{row.get('candidates', DEFAULT_CANDIDATES)} candidates, "
            f"{row.get('refresh_dtype', DEFAULT_REFRESH_DTYPE)} refresh"
            for row in results["candidate_search"]
        )
        lines += [
            f"The candidate search beside the exact one over the same steps ({lists}):",
            "",
            *candidate_search_table(results["candidate_search"]),
            "",
        ]
    return "\n".join(lines)
