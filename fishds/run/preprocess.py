"""`fishds preprocess --config X [--ds_config Y] [--debug N]`: every split of a config checked, tokenised and put
into the token cache (fishds/tokens.py) in one process, before a launch.

The launch of the same config then finds each split in the cache (its log says `cache hit`) and starts training
without any rank tokenising: on many nodes, the tokenising wait under the collective timeout is gone. It runs the
same preflight as `fishds train` (with the world size the environment gives, 1 when started plainly; the cache does
not depend on it) and loads the tokenizer, never the weights. Packing needs nothing cached (a view over the
examples, fishds/run/formats.pack); the number of packed blocks is printed.

`--debug N` prints the first N training examples with the trained tokens (label != -100) marked against the
masked prompt tokens: green on a terminal, inside [[ ]] otherwise, with each example's length, trained tokens and
whether data.max_length cut it.
"""

from __future__ import annotations

import sys

from ..config import Config

GREEN, DIM, RESET = "\x1b[32m", "\x1b[2m", "\x1b[0m"
OPEN, CLOSE = "[[", "]]"


def marked(tokenizer, ids: list[int], labels: list[int], colour: bool) -> str:
    """The decoded example, trained spans (label != -100) coloured or inside [[ ]]."""
    spans, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != -100) != (labels[start] != -100):
            spans.append((labels[start] != -100, tokenizer.decode(ids[start:i])))
            start = i
    if colour:
        return "".join(f"{GREEN}{t}{RESET}" if trained else f"{DIM}{t}{RESET}" for trained, t in spans)
    return "".join(f"{OPEN}{t}{CLOSE}" if trained else t for trained, t in spans)


def debug_lines(tokenizer, examples: list[dict], n: int, labels: list | None, colour: bool) -> list[str]:
    """N examples ({"input_ids", "labels", "truncated"}), marked (per-token labels) or with their class."""
    out = []
    for i, e in enumerate(examples[:n]):
        cut = "yes" if e["truncated"] else "no"
        if isinstance(e["labels"], int):
            out.append(
                f"--- example {i}: {len(e['input_ids'])} tokens, class {labels[e['labels']]!r}, truncated: {cut}"
            )
            out.append(tokenizer.decode(e["input_ids"]))
            continue
        trained = sum(x != -100 for x in e["labels"])
        out.append(
            f"--- example {i}: {len(e['input_ids'])} tokens, {trained} trained "
            f"({'green' if colour else OPEN + ' ' + CLOSE}), truncated: {cut}"
        )
        out.append(marked(tokenizer, e["input_ids"], e["labels"], colour))
    return out


def preprocess(cfg: Config, ds_path: str | None = None, debug: int = 0, colour: bool | None = None) -> dict:
    """Tokenise every split of `cfg` into the token cache; returns {key: counts} and prints one line per split."""
    import datasets

    from ..model import load_tokenizer
    from .formats import pack
    from .preflight import preflight
    from .train import load_data

    plan = preflight(cfg, ds_path)
    tokenizer = load_tokenizer(plan.model_path, cfg.model.trust_remote_code)
    files: dict = {}
    examples, _, _ = load_data(cfg, plan, tokenizer, files)
    for key, (file, hit) in files.items():
        print(f"[fishds.preprocess] {key}: {'already cached' if hit else 'cached'} in {file}")
    if cfg.data.packing:
        print(
            f"[fishds.preprocess] data.packing: {len(pack(examples, cfg.data.max_length)):,} blocks of at most "
            f"{cfg.data.max_length} tokens from {len(examples):,} examples"
        )
    if debug:
        first = plan.sources[0].key
        ds = datasets.Dataset.from_file(files[first][0])  # the cached split, in row order
        shown = []
        for i in range(len(ds)):
            if len(shown) == debug:
                break
            row = ds[i]
            if row["input_ids"]:  # not dropped, not a blank line
                shown.append(row)
        colour = sys.stdout.isatty() if colour is None else colour
        print(f"[fishds.preprocess] the first {len(shown)} examples of {first}:")
        print("\n".join(debug_lines(tokenizer, shown, debug, plan.labels, colour)))
    return plan.data_counts
