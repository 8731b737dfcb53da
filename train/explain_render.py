"""Pictures of explanations: tokens highlighted by a score, as HTML and as a PNG.

A row is {"label": str, "pieces": [str], "scores": [float], "signed": bool}: signed
scores (integrated gradients: red for the target, blue against) are scaled by the row's
largest |score|, unsigned ones (attention rollout, attention mass) by its largest score.
The PNG needs matplotlib (installed with the project's plotting extras); the HTML nothing.
"""

import html

import numpy as np

# Word-start markers of sentencepiece ("▁") and byte-level BPE ("Ġ"; "Ċ" is a newline).
_PIECE_MARKERS = {"\u2581": " ", "\u0120": " ", "\u010a": "\u23ce"}


def display_piece(piece: str) -> str:
    for marker, shown in _PIECE_MARKERS.items():
        piece = piece.replace(marker, shown)
    return piece


def _scaled(scores, signed):
    scores = np.asarray(scores, np.float64)
    top = np.abs(scores).max() if signed else scores.max()
    return scores / top if top > 0 else np.zeros_like(scores)


def _rgb(value, signed):
    """value in [-1, 1] (signed) or [0, 1] -> an (r, g, b) in [0, 1]: white to red, or
    white to blue below zero."""
    v = float(np.clip(value, -1.0, 1.0))
    if v >= 0:
        return (1.0, 1.0 - 0.75 * v, 1.0 - 0.75 * v) if signed else (1.0, 1.0 - 0.6 * v,
                                                                      1.0 - 0.85 * v)
    return (1.0 + 0.75 * v, 1.0 + 0.75 * v, 1.0)


def tokens_html(title, rows) -> str:
    """-> a standalone HTML page: each row's pieces on a background by score (the raw
    score in each piece's tooltip)."""
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<body style='font-family:monospace;max-width:60em'>",
             f"<h3>{html.escape(title)}</h3>"]
    for row in rows:
        parts.append(f"<p><b>{html.escape(row['label'])}</b><br>")
        for piece, raw, value in zip(row["pieces"], row["scores"],
                                     _scaled(row["scores"], row["signed"])):
            r, g, b = (int(255 * c) for c in _rgb(value, row["signed"]))
            parts.append(f"<span title='{raw:.4g}' style='background:rgb({r},{g},{b})'>"
                         f"{html.escape(display_piece(piece))}</span>")
        parts.append("</p>")
    return "".join(parts) + "</body>\n"


def tokens_png(path, title, rows, line_chars=90):
    """Writes a PNG: each row's label, then its pieces on coloured boxes, wrapped at
    `line_chars` characters (monospace, so widths are character counts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = []  # (kind, payload) per text line: ("label", str) or ("pieces", [(x, piece, rgb)]).
    for row in rows:
        lines.append(("label", row["label"]))
        current, x = [], 0
        for piece, value in zip(row["pieces"], _scaled(row["scores"], row["signed"])):
            shown = display_piece(piece)
            if x + len(shown) > line_chars and current:
                lines.append(("pieces", current))
                current, x = [], 0
            current.append((x, shown, _rgb(value, row["signed"])))
            x += len(shown)
        lines.append(("pieces", current))
    char_w, line_h = 0.105, 0.3  # Inches per character and per line at 11 pt.
    fig = plt.figure(figsize=(line_chars * char_w + 0.4, (len(lines) + 1.5) * line_h))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(-2, line_chars + 2)
    ax.set_ylim(len(lines) + 1.5, 0)
    ax.axis("off")
    ax.text(0, 0.8, title, fontsize=11, weight="bold", va="center")
    for i, (kind, payload) in enumerate(lines, start=2):
        if kind == "label":
            ax.text(0, i, payload, fontsize=10, style="italic", va="center")
            continue
        for x, shown, rgb in payload:
            ax.add_patch(matplotlib.patches.Rectangle((x, i - 0.42), len(shown), 0.84,
                                                      color=rgb, linewidth=0))
            ax.text(x, i, shown, fontsize=10, family="monospace", va="center")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def image_png(path, title, image, maps):
    """Writes a PNG: the image, then each (name, map [H, W], signed) heat map over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = np.asarray(image, np.float64)
    gray = image.mean(-1) if image.ndim == 3 else image
    fig, axes = plt.subplots(1, 1 + len(maps), figsize=(2.6 * (1 + len(maps)), 2.9))
    axes[0].imshow(gray, cmap="gray")
    axes[0].set_title("input", fontsize=9)
    for ax, (name, values, signed) in zip(axes[1:], maps):
        values = np.asarray(values, np.float64)
        top = np.abs(values).max() or 1.0
        ax.imshow(gray, cmap="gray", alpha=0.5)
        ax.imshow(values, cmap="bwr" if signed else "Reds", alpha=0.7,
                  vmin=-top if signed else 0.0, vmax=top,
                  extent=(-0.5, gray.shape[1] - 0.5, gray.shape[0] - 0.5, -0.5))
        ax.set_title(name, fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
