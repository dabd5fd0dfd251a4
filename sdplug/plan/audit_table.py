"""The audit as a short table, printed at the end of every host's run.

One labelled row per fact a person checks at a glance, with its unit: what each strategy did,
the timesteps drawn, the loss weights over the schedule, the optimizer and its state, and the
problems. ``audit.json`` holds the rest.
"""

from __future__ import annotations

from typing import Any


def summary_table(r: dict[str, Any]) -> str:
    """The report (``plan.report()``, or the audit's own part of it) as rows of ``label  value``."""
    rows: list[tuple[str, str]] = [("steps", f"{r['steps']} optimizer steps")]
    rows += _noise_rows(r.get("noise"))
    rows += _timestep_rows(r.get("timesteps"))
    if "loss" in r:
        rows.append(("loss type", f"{r['loss']['type']}, {r['loss']['calls']} calls"))
    if "loss_weighting" in r:
        w = r["loss_weighting"]
        means = " ".join("-" if v is None else f"{v:.2g}" for v in w["mean_weight_per_timestep_bin"])
        axis = r.get("timesteps", {}).get("binned_by", "t")
        rows.append(("loss weighting", f"{w['type']}, {w['calls']} calls; mean weight in each tenth of {axis}: {means}"))
    rows += _caption_rows(r.get("caption"))
    if "optimizer" in r:
        rows.append(("optimizer", _optimizer(r["optimizer"])))
    if "ema" in r:
        e = r["ema"]
        every = "every step" if e["update_every"] == 1 else f"every {e['update_every']} steps"
        start = f" from step {e['start_step']}" if e["start_step"] else ""
        averaged = e.get("averages", "the trained weights")
        rows.append(
            ("ema", f"decay {e['decay']:g}, {e['updates']} updates ({every}{start}) of {averaged}, kept on {e['device']}")
        )
    if "schedule" in r:
        s = r["schedule"]
        if s.get("process") == "flow":
            shift = "by resolution" if s["shift"] == "dynamic" else f"{s['shift']:g}"
            output = "" if s.get("output", "raw") == "raw" else f", {s['output']} output"
            rows.append(("schedule", f"rectified flow, {s['prediction_type']} prediction{output}, shift {shift}"))
        else:
            zero_terminal = "on" if s["zero_terminal_snr"] else "off"
            rows.append(("schedule", f"{s['prediction_type']} prediction, zero-terminal SNR {zero_terminal}"))
    if "attention" in r:
        rows.append(("attention", _attention(r["attention"])))
    if "memory" in r:
        rows.append(("memory", ", ".join(f"{k}={v}" for k, v in r["memory"].items())))
    if "problems" in r:
        rows.append(("problems", "; ".join(str(p) for p in r["problems"]) or "none"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _noise_rows(n: dict[str, Any] | None) -> list[tuple[str, str]]:
    if n is None:
        return []
    rows = []
    for entry in n["applied"]:
        value = f"{entry['calls']} calls"
        for size, facts in entry.get("per_latent_size", {}).items():
            if "octaves_used" in facts:
                cells = ", ".join(str(c) for c in facts["octave_cells"])
                value += f"; {size} latents: {facts['octaves_used']} octaves of {cells} lattice cells"
        rows.append((f"noise {entry['type']}", value))
    rows.append(("noise std", f"{n['target_std_mean']:.3f} (N(0, I): 1)"))
    if n["channel_mean_variance_mean"] is not None and n["gaussian_channel_mean_variance"]:
        ratio = n["channel_mean_variance_mean"] / n["gaussian_channel_mean_variance"]
        rows.append(("low-freq energy", f"{ratio:.2f}x N(0, I)'s (variance of channel means)"))
    return rows


def _timestep_rows(t: dict[str, Any] | None) -> list[tuple[str, str]]:
    if t is None:
        return []
    draws = t["draws"]
    if not draws:
        return [("timesteps", f"{t['type']}, none drawn")]
    shares = " ".join(f"{100 * count / draws:.0f}" for count in t["histogram"])
    axis = t.get("binned_by", "t")
    return [("timesteps", f"{t['type']}, {draws} draws; % in each tenth of {axis}, low to high: {shares}")]


def _caption_rows(c: dict[str, Any] | None) -> list[tuple[str, str]]:
    if c is None:
        return []
    rows = []
    encoders = c.get("encoders") or {}
    if c["samples"] == 0:
        rows.append(("caption dropout", "no captions drawn"))
    elif not encoders or c["dropout_rate_configured"]:  # whole captions (a preset naming encoders only: per encoder)
        verdict = "ok" if c["dropout_rate_within_interval"] else "OUTSIDE its 99.9% interval"
        rows.append(
            (
                "caption dropout",
                f"{c['dropout_rate_realised']:.1%} of {c['samples']} captions realised vs "
                f"{_percent(c['dropout_rate_configured'])} configured ({verdict})",
            )
        )
    for name, e in encoders.items():
        if c["samples"]:
            verdict = "ok" if e["dropout_rate_within_interval"] else "OUTSIDE its 99.9% interval"
            rows.append(
                (
                    f"dropout of {name}",
                    f"{e['dropout_rate_realised']:.1%} of {c['samples']} samples realised vs "
                    f"{_percent(e['dropout_rate_configured'])} configured ({verdict})",
                )
            )
    for tags in c.get("tag_dropout", []):
        if tags["tags_droppable"]:
            verdict = "ok" if tags["tag_drop_rate_within_interval"] else "OUTSIDE its 99.9% interval"
            kept = "keep_tokens always kept" if tags["keep_tokens_always_kept"] else "KEEP_TOKENS TAGS LOST"
            rows.append(
                (
                    f"tag dropout [{tags['caption_index']}]",
                    f"{tags['tag_drop_rate_realised']:.1%} of {tags['tags_droppable']} tags vs "
                    f"{_percent(tags['tag_drop_rate_configured'])} configured ({verdict}); {kept}",
                )
            )
    return rows


def _percent(rate: float) -> str:
    """A configured rate as a percentage, as configured (0.1: 10%, not 10.000000000000002%)."""
    return f"{100 * rate:.6g}%"


def _optimizer(o: dict[str, Any]) -> str:
    name = o["class"].rsplit(".", 1)[-1]
    strategy = o["strategy"] + (", the preset's fallback" if o.get("fell_back") else "")
    lrs = ", ".join(f"{lr:g}" for lr in o["learning_rates"])
    return (
        f"{name} ({strategy}), lr {lrs}; {o['state_bytes_per_trainable_parameter']:.2f} bytes of state per "
        f"trained parameter, {o['trainable_parameters']:,} trained parameters"
    )


def _attention(a: dict[str, Any]) -> str:
    if {"processor", "processor_before", "modules", "changed"} <= set(a):
        return f"{a['strategy']}: {a['changed']} of {a['modules']} modules changed ({a['processor_before']} -> {a['processor']})"
    return ", ".join(f"{k}={v}" for k, v in a.items())  # a host's own switch says what it changed
