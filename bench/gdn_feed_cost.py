"""GPU: training-step time of GDN models under bf16 autocast, with the chunk kernel fed bf16 q, k, v
(the model's path) or fp32 (its fp32 kernel path: tf32x3 dots, one pipeline stage).

    python3 bench/gdn_feed_cost.py

Presets 20m (B=32, T=512, as the experiments of docs/results.md train) and 125m (B=8, T=2048), all-recurrent
and mixed (every other 64-token block in attention) plans; AdamW step included. Best of three
rounds of 10 steps each, the two feeds alternating. Prints ms per step and tokens/s as JSON lines.
"""
import json
import time

import torch

from oryx_core.config import preset
from oryx_torch import model as model_module
from oryx_torch.kernels.gdn import fed_fp32

bf16_feed = model_module.gated_delta_rule
fp32_feed = fed_fp32(bf16_feed)


def main():
    results = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for name, B, T in (("20m", 32, 512), ("125m", 8, 2048)):
        cfg = preset(name, "gdn")
        model = model_module.OryxModel(cfg, seed=0).cuda()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        tokens = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
        for plan in ("recurrent", "mixed"):
            modes = torch.zeros(B, T, dtype=torch.bool, device="cuda")
            if plan == "mixed":
                modes.view(B, T // 64, 64)[:, ::2] = True

            def step():
                with torch.autocast("cuda", torch.bfloat16):
                    logits = model(tokens[:, :-1], modes[:, :-1])
                    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            times = {"bf16": [], "fp32": []}
            for _ in range(3):
                for feed, kernel in (("fp32", fp32_feed), ("bf16", bf16_feed)):
                    model_module.gated_delta_rule = kernel
                    for _ in range(3):
                        step()
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    for _ in range(10):
                        step()
                    torch.cuda.synchronize()
                    times[feed].append((time.perf_counter() - start) / 10 * 1e3)
            model_module.gated_delta_rule = bf16_feed
            row = {f"ms_{feed}": min(t) for feed, t in times.items()}
            row.update({f"tok_s_{feed}": B * (T - 1) / row[f"ms_{feed}"] * 1e3 for feed in times})
            results[f"{name} B{B} T{T} {plan}"] = row
            print(json.dumps({"case": f"{name} B{B} T{T} {plan}", **row}), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
