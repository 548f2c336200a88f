"""``MemoryProfile.plot``: per-segment activations and stacked totals, original vs converted (PNG)."""

from __future__ import annotations

from typing import Any

__all__ = ["plot_profile"]

_MIB = 1024 ** 2


def _pyplot():  # noqa: ANN202 - matplotlib.pyplot, imported on demand
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(
            "MemoryProfile.plot needs matplotlib, which is not installed; install the plot extra: "
            "pip install 'revconvert[plot]'") from e
    return plt


def plot_profile(profile: Any, path: str) -> None:
    """Draw ``profile`` to ``path``: left, activations per segment; right, the stacked peak parts."""
    plt = _pyplot()
    rows = profile.rows()
    names = [name for name, _, _ in rows]
    orig = [(o.activation_bytes if o else 0) / _MIB for _, o, _ in rows]
    conv = [(c.activation_bytes if c else 0) / _MIB for _, _, c in rows]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8.0, 0.35 * len(names) + 5), 4.8),
                                   gridspec_kw={"width_ratios": [3, 1]})
    xs = range(len(names))
    width = 0.4 if profile.converted is not None else 0.8
    ax1.bar([x - width / 2 if profile.converted else x for x in xs], orig, width, label="original")
    if profile.converted is not None:
        ax1.bar([x + width / 2 for x in xs], conv, width, label="converted")
    ax1.set_xticks(list(xs))
    ax1.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax1.set_ylabel("saved for backward (MiB)")
    ax1.set_title(f"activations per segment, batch {profile.batch_size}")
    ax1.legend()

    models = [("original", profile.original)]
    if profile.converted is not None:
        models.append(("converted", profile.converted))
    parts = list(dict.fromkeys(p for _, b in models for p, v in b.peak_composition.items() if v))
    bottoms = [0.0] * len(models)
    for part in parts:
        heights = [b.peak_composition.get(part, 0) / _MIB for _, b in models]
        ax2.bar([m for m, _ in models], heights, bottom=bottoms, label=part)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax2.set_ylabel("MiB at peak")
    ax2.set_title("peak training memory")
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png", bbox_inches="tight")
    plt.close(fig)
