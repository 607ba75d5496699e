"""Pictures of the sampler at work: the order in which answer tokens were committed.

    g = model.generate(image, prompt, return_details=True)
    denoising_order_png(g.tokens, g.committed_at, model.tokenizer, "order.png")

The answer is laid out as text in a grid, one cell per token, each cell coloured by the
denoising step that committed it (a colour bar maps colours to steps); cells never committed
are grey. Positions after the first <|eot_id|> are left out.
"""

from __future__ import annotations

import os

import numpy as np

COLUMNS = 12  # tokens per grid row
NEVER = "#d0d0d0"  # cells never committed
_SHOWN = {"\n": "⏎", "\t": "⇥"}  # whitespace that would vanish in a cell


def _label(tokenizer, token: int, eot: int, mask: int) -> str:
    if token == eot:
        return "<eot>"
    if token == mask:
        return "<mask>"
    text = tokenizer.decode([int(token)])
    for raw, shown in _SHOWN.items():
        text = text.replace(raw, shown)
    text = text.replace(" ", "·") if text.strip() == "" else text
    return text if len(text) <= 10 else text[:9] + "…"


def denoising_order_png(
    tokens, committed_at, tokenizer, path: str | os.PathLike, *, title: str | None = None
) -> str:
    """Draws one answer's denoising order into a PNG at `path`; returns the path.

    tokens, committed_at: [gen_length] (or [1, gen_length]) as returned with
    `return_details=True`; `tokenizer` decodes each cell's text.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt
    from matplotlib import colors

    tokens = np.asarray(tokens).reshape(-1)
    committed_at = np.asarray(committed_at).reshape(-1)
    if tokens.shape != committed_at.shape:
        raise ValueError(f"tokens {tokens.shape} and committed_at {committed_at.shape} differ")
    eot = np.flatnonzero(tokens == tokenizer.eot_id)
    n = int(eot[0]) + 1 if eot.size else tokens.size  # keep the <|eot_id|> cell itself
    tokens, committed_at = tokens[:n], committed_at[:n]
    cols = max(1, min(COLUMNS, n))
    rows = max(1, -(-n // cols))
    last = max(int(committed_at.max(initial=0)), 1)
    cmap = plt.get_cmap("viridis")
    norm = colors.Normalize(vmin=0, vmax=last)

    fig, ax = plt.subplots(figsize=(cols * 0.9 + 1.5, rows * 0.45 + 1.2))
    for i, (token, step) in enumerate(zip(tokens, committed_at, strict=True)):
        r, c = divmod(i, cols)
        face = cmap(norm(step)) if step >= 0 else NEVER
        ax.add_patch(plt.Rectangle((c, r), 0.96, 0.9, facecolor=face, edgecolor="white"))
        # Dark text on the light end of viridis, light text on the dark end.
        ink = "black" if step < 0 or norm(step) > 0.55 else "white"
        ax.text(c + 0.48, r + 0.45, _label(tokenizer, token, tokenizer.eot_id,
                                           tokenizer.mask_id),
                ha="center", va="center", fontsize=8, color=ink)
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)  # first row on top, as text reads
    ax.set_aspect(0.5)  # cells twice as wide as tall: room for a word
    ax.set_axis_off()
    ax.set_title(title or f"denoising order: {n} positions, steps 0-{last}", fontsize=10)
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.03,
                       pad=0.02)
    bar.set_label("step committed")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return os.fspath(path)
