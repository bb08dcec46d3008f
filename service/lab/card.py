"""A model card's generated sections: each table lives between `<!-- section:start -->` and `:end` markers,
replaced in place when re-measured (eval, fidelity, drift), before the card's closing `weights_sha256` line."""

from __future__ import annotations

import re
from pathlib import Path


def write_card_table(model_dir: Path, text: str, section: str = "eval") -> None:
    card = model_dir / "MODEL_CARD.md"
    body = card.read_text()
    title = {"eval": "Evaluation", "fidelity": "Distribution fidelity",
             "drift": "Long rollouts (drift)", "knobs": "Joint fidelity against the speed knobs",
             "calibration": "Done-head calibration"}.get(section, section)
    block = f"<!-- {section}:start -->\n## {title}\n\n{text}\n<!-- {section}:end -->"
    if f"<!-- {section}:start -->" in body:
        body = re.sub(rf"<!-- {section}:start -->.*<!-- {section}:end -->", lambda _: block, body, flags=re.S)
    else:
        head, sep, sha = body.rpartition("\nweights_sha256:")
        body = f"{head.rstrip()}\n\n{block}\n{sep}{sha}"
    card.write_text(body)
