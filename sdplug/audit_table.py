"""The audit as a small table, printed at the end of every host's run."""

from __future__ import annotations

from typing import Any


def summary_table(r: dict[str, Any]) -> str:
    """The audit report as a small table of rows: the strategies and what they realised."""
    rows = [("steps", str(r["steps"]))]
    for entry in r.get("noise", {}).get("applied", []):
        rows.append((f"noise {entry['type']}", f"{entry['calls']} calls"))
    if "noise" in r:
        n = r["noise"]
        gaussian = n["gaussian_channel_mean_variance"] or float("nan")
        rows.append(("noise std (mean)", f"{n['target_std_mean']:.3f}"))
        if n["channel_mean_variance_mean"] is not None:
            rows.append(("low-freq energy", f"{n['channel_mean_variance_mean']:.4g} (gaussian {gaussian:.4g})"))
    if "loss_weighting" in r:
        weights = [w for w in r["loss_weighting"]["mean_weight_per_timestep_bin"] if w is not None]
        rows.append(
            (
                f"weighting {r['loss_weighting']['type']}",
                f"{r['loss_weighting']['calls']} calls, mean weight {min(weights, default=0):.3g}..{max(weights, default=0):.3g} over t bins",
            )
        )
    if "caption" in r:
        c = r["caption"]
        if c["samples"] == 0:
            rows.append(("caption dropout", "no captions drawn"))
        else:
            verdict = "ok" if c["dropout_rate_within_interval"] else "OUTSIDE 99.9% interval"
            rows.append(
                (
                    "caption dropout",
                    f"{c['dropout_rate_realised']:.3f} realised vs {c['dropout_rate_configured']:.3f} configured ({verdict})",
                )
            )
        for tags in c.get("tag_dropout", []):
            if tags["tags_droppable"]:
                verdict = "ok" if tags["tag_drop_rate_within_interval"] else "OUTSIDE 99.9% interval"
                kept = "keep_tokens always kept" if tags["keep_tokens_always_kept"] else "KEEP_TOKENS TAGS LOST"
                rows.append(
                    (
                        f"tag dropout [{tags['caption_index']}]",
                        f"{tags['tag_drop_rate_realised']:.3f} of {tags['tags_droppable']} tags vs "
                        f"{tags['tag_drop_rate_configured']:.3f} ({verdict}); {kept}",
                    )
                )
    for key in ("optimizer", "attention", "memory"):
        if key in r:
            rows.append((key, ", ".join(f"{k}={v}" for k, v in r[key].items())))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
