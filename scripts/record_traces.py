"""Record more real allocator traces, from workloads other than the five shared ones, so the
gpumem policy is checked on programs it was not tuned on.

Runs on a GPU machine with PyTorch, beside shared/bench/gen_traces.py (whose recorder it
reuses: same format, one fresh process per workload):

    python3 scripts/record_traces.py OUTDIR [GEN_TRACES_DIR]
"""
import os, subprocess, sys

HERE = os.path.abspath(__file__)


def workload(name):
    import torch
    dev = "cuda"
    torch.manual_seed(0)
    if name == "transformer_lm_fp16":
        # a 12-layer pre-norm transformer language model, fp16 autocast, AdamW
        d, vocab = 1024, 32000
        emb = torch.nn.Embedding(vocab, d).to(dev)
        layer = torch.nn.TransformerEncoderLayer(d, 16, 4 * d, batch_first=True, norm_first=True)
        body = torch.nn.TransformerEncoder(layer, 12).to(dev)
        head = torch.nn.Linear(d, vocab).to(dev)
        params = list(emb.parameters()) + list(body.parameters()) + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=1e-4)
        mask = torch.nn.Transformer.generate_square_subsequent_mask(512, device=dev)

        def step(i):
            ids = torch.randint(0, vocab, (8, 512), device=dev)
            with torch.autocast("cuda", dtype=torch.float16):
                logits = head(body(emb(ids), mask=mask, is_causal=True))
                loss = torch.nn.functional.cross_entropy(logits.float().view(-1, vocab), ids.view(-1))
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        return step, 4
    if name == "unet_seg_train":
        # a small U-Net for segmentation, 256x256, batch 16, SGD
        def block(i, o):
            return torch.nn.Sequential(torch.nn.Conv2d(i, o, 3, padding=1), torch.nn.BatchNorm2d(o), torch.nn.ReLU(),
                                       torch.nn.Conv2d(o, o, 3, padding=1), torch.nn.BatchNorm2d(o), torch.nn.ReLU())

        class UNet(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.d1, self.d2, self.d3 = block(3, 64), block(64, 128), block(128, 256)
                self.mid = block(256, 512)
                self.u3, self.u2, self.u1 = block(512 + 256, 256), block(256 + 128, 128), block(128 + 64, 64)
                self.out = torch.nn.Conv2d(64, 21, 1)

            def forward(self, x):
                p = torch.nn.functional.max_pool2d
                up = lambda t: torch.nn.functional.interpolate(t, scale_factor=2)
                a = self.d1(x); b = self.d2(p(a, 2)); c = self.d3(p(b, 2)); m = self.mid(p(c, 2))
                c = self.u3(torch.cat([up(m), c], 1)); b = self.u2(torch.cat([up(c), b], 1))
                return self.out(self.u1(torch.cat([up(b), a], 1)))

        m = UNet().to(dev)
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)

        def step(i):
            x = torch.randn(16, 3, 256, 256, device=dev)
            y = torch.randint(0, 21, (16, 256, 256), device=dev)
            loss = torch.nn.functional.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        return step, 4
    if name == "mlp_varbatch_infer":
        # inference serving: a wide MLP under requests of random batch sizes, no grad
        m = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.GELU()) for _ in range(8)]).to(dev).half()
        g = torch.Generator().manual_seed(7)

        def step(i):
            with torch.no_grad():
                for _ in range(10):
                    b = int(torch.randint(1, 2048, (1,), generator=g))
                    m(torch.randn(b, 4096, device=dev, dtype=torch.half)).sum().item()
        return step, 6
    if name == "t5_train":
        from transformers import T5Config, T5ForConditionalGeneration
        m = T5ForConditionalGeneration(T5Config(d_model=512, d_ff=2048, num_layers=6, num_heads=8, decoder_start_token_id=0, pad_token_id=0)).to(dev)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(3)

        def step(i):
            b, ls, lt = 16, int(torch.randint(64, 512, (1,), generator=g)), int(torch.randint(16, 128, (1,), generator=g))
            src = torch.randint(0, 32128, (b, ls), device=dev)
            tgt = torch.randint(0, 32128, (b, lt), device=dev)
            loss = m(input_ids=src, labels=tgt).loss
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        return step, 8
    if name == "lstm_varlen_train":
        # a 3-layer LSTM language model over batches of random sequence lengths, Adam
        vocab, d = 16000, 1024
        emb = torch.nn.Embedding(vocab, d).to(dev)
        rnn = torch.nn.LSTM(d, d, num_layers=3, batch_first=True).to(dev)
        head = torch.nn.Linear(d, vocab).to(dev)
        params = list(emb.parameters()) + list(rnn.parameters()) + list(head.parameters())
        opt = torch.optim.Adam(params, lr=1e-3)
        g = torch.Generator().manual_seed(11)

        def step(i):
            t = int(torch.randint(64, 384, (1,), generator=g))
            ids = torch.randint(0, vocab, (32, t + 1), device=dev)
            out, _ = rnn(emb(ids[:, :-1]))
            loss = torch.nn.functional.cross_entropy(head(out).flatten(0, 1), ids[:, 1:].flatten())
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        return step, 6
    if name == "multiscale_cnn_train":
        # a plain conv net trained on images whose resolution changes every step, SGD momentum
        chans = [3, 64, 128, 256, 512]
        layers = []
        for a, b in zip(chans, chans[1:]):
            layers += [torch.nn.Conv2d(a, b, 3, padding=1), torch.nn.BatchNorm2d(b), torch.nn.ReLU(),
                       torch.nn.Conv2d(b, b, 3, padding=1), torch.nn.BatchNorm2d(b), torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
        m = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(512, 1000)).to(dev)
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(5)

        def step(i):
            r = 32 * int(torch.randint(4, 11, (1,), generator=g))
            x = torch.randn(48, 3, r, r, device=dev)
            y = torch.randint(0, 1000, (48,), device=dev)
            loss = torch.nn.functional.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        return step, 8
    raise SystemExit("unknown workload " + name)


NAMES = ["transformer_lm_fp16", "unet_seg_train", "mlp_varbatch_infer", "t5_train", "lstm_varlen_train",
         "multiscale_cnn_train"]

if __name__ == "__main__":
    if sys.argv[1] == "one":
        sys.path.insert(0, sys.argv[5])
        import gen_traces
        gen_traces.workload = workload
        gen_traces.run_one(sys.argv[2], sys.argv[3], sys.argv[4] == "1")
    else:
        outdir = sys.argv[1]
        bench = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(HERE), "..", "..", "shared", "bench")
        for name in NAMES:
            r = subprocess.run([sys.executable, HERE, "one", name, f"{outdir}/{name}.jsonl.gz", "1", bench],
                               capture_output=True, text=True, timeout=300)
            print(r.stdout.strip() or ("ERR " + name + " " + r.stderr[-800:]), flush=True)
