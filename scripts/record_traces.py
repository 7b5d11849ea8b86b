"""Record more real allocator traces, from workloads other than the five shared ones, so the
gpumem policy is checked on programs it was not tuned on.

Runs on a GPU machine with PyTorch, beside shared/bench/gen_traces.py (whose recorder it
reuses: same format, one fresh process per workload):

    python3 scripts/record_traces.py OUTDIR [GEN_TRACES_DIR [NAME,NAME...]]
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
    if name == "llm_decode_kvcache":
        # Autoregressive decoding, batch 8: a 12-layer decoder (d 1024, 16 heads, vocab 32000)
        # whose weights are built in fp32 and converted to fp16, a 512-token prompt, then 384
        # new tokens, each layer's KV cache grown by torch.cat at every token (as Hugging
        # Face's DynamicCache does); two prompts. (A re-creation: the code that recorded
        # testdata/llm_decode_kvcache.jsonl.gz was not kept; see testdata/README.md.)
        d, heads, n_layers, vocab = 1024, 16, 12, 32000

        class Block(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
                self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
                self.fc1, self.fc2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

            def forward(self, x, cache):
                b, t, _ = x.shape
                q, k, v = (z.view(b, t, heads, d // heads).transpose(1, 2) for z in self.qkv(self.ln1(x)).split(d, 2))
                if cache is not None:
                    k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
                a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=cache is None)
                x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
                return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x)))), (k, v)

        emb, blocks = torch.nn.Embedding(vocab, d), torch.nn.ModuleList(Block() for _ in range(n_layers))
        ln, head = torch.nn.LayerNorm(d), torch.nn.Linear(d, vocab, bias=False)
        torch.nn.ModuleList([emb, blocks, ln, head]).to(dev).half().eval()

        @torch.no_grad()
        def step(i):
            x = emb(torch.randint(0, vocab, (8, 512), device=dev))
            caches = [None] * n_layers
            for t in range(385):
                for j, blk in enumerate(blocks):
                    x, caches[j] = blk(x, caches[j])
                x = emb(head(ln(x[:, -1:])).argmax(-1))
        return step, 2
    if name == "gan_train":
        # A DCGAN on 64x64 images, batch 128: two models, two Adam optimizers, the
        # discriminator stepped on real and generated images, then the generator
        nz, ngf, ndf = 100, 64, 64
        ct, cv, bn = torch.nn.ConvTranspose2d, torch.nn.Conv2d, torch.nn.BatchNorm2d
        gen = torch.nn.Sequential(
            ct(nz, ngf * 8, 4, 1, 0, bias=False), bn(ngf * 8), torch.nn.ReLU(True),
            ct(ngf * 8, ngf * 4, 4, 2, 1, bias=False), bn(ngf * 4), torch.nn.ReLU(True),
            ct(ngf * 4, ngf * 2, 4, 2, 1, bias=False), bn(ngf * 2), torch.nn.ReLU(True),
            ct(ngf * 2, ngf, 4, 2, 1, bias=False), bn(ngf), torch.nn.ReLU(True),
            ct(ngf, 3, 4, 2, 1, bias=False), torch.nn.Tanh()).to(dev)
        lrelu = lambda: torch.nn.LeakyReLU(0.2, inplace=True)
        disc = torch.nn.Sequential(
            cv(3, ndf, 4, 2, 1, bias=False), lrelu(),
            cv(ndf, ndf * 2, 4, 2, 1, bias=False), bn(ndf * 2), lrelu(),
            cv(ndf * 2, ndf * 4, 4, 2, 1, bias=False), bn(ndf * 4), lrelu(),
            cv(ndf * 4, ndf * 8, 4, 2, 1, bias=False), bn(ndf * 8), lrelu(),
            cv(ndf * 8, 1, 4, 1, 0, bias=False)).to(dev)
        og = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
        od = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
        bce = torch.nn.functional.binary_cross_entropy_with_logits

        def step(i):
            real = torch.randn(128, 3, 64, 64, device=dev)
            fake = gen(torch.randn(128, nz, 1, 1, device=dev))
            ones, zeros = torch.ones(128, device=dev), torch.zeros(128, device=dev)
            od.zero_grad(set_to_none=True)
            loss_d = bce(disc(real).view(-1), ones) + bce(disc(fake.detach()).view(-1), zeros)
            loss_d.backward(); od.step()
            og.zero_grad(set_to_none=True)
            bce(disc(fake).view(-1), ones).backward(); og.step()
        return step, 8
    if name == "resnet_gradaccum_varbatch":
        # ResNet-34, SGD, each step accumulating gradients over four micro-batches of random
        # sizes (8-64 images of 224x224)
        import torchvision
        m = torchvision.models.resnet34().to(dev)
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(3)

        def step(i):
            opt.zero_grad(set_to_none=True)
            for _ in range(4):
                b = int(torch.randint(8, 65, (1,), generator=g))
                x, y = torch.randn(b, 3, 224, 224, device=dev), torch.randint(0, 1000, (b,), device=dev)
                (torch.nn.functional.cross_entropy(m(x), y) / 4).backward()
            opt.step()
        return step, 6
    if name == "moe_train":
        # A mixture-of-experts transformer (8 layers, d 1024, 8 experts of 4096, top-2 routing),
        # bf16 autocast, AdamW: every expert runs on however many tokens the router sends it,
        # so the activation sizes change at every layer and every step
        d, n_exp, n_layers = 1024, 8, 8

        class MoE(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.attn = torch.nn.MultiheadAttention(d, 16, batch_first=True)
                self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
                self.router = torch.nn.Linear(d, n_exp)
                self.experts = torch.nn.ModuleList(
                    torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))
                    for _ in range(n_exp))

            def forward(self, x):
                h = self.ln1(x)
                x = x + self.attn(h, h, h, need_weights=False)[0]
                h = self.ln2(x).reshape(-1, d)
                w, idx = self.router(h).softmax(-1).topk(2, -1)
                out = torch.zeros_like(h)
                for e in range(n_exp):
                    rows, slot = (idx == e).nonzero(as_tuple=True)
                    if rows.numel():
                        out.index_add_(0, rows, self.experts[e](h[rows]) * w[rows, slot, None])
                return x + out.view_as(x)

        layers = torch.nn.Sequential(*[MoE() for _ in range(n_layers)]).to(dev)
        opt = torch.optim.AdamW(layers.parameters(), lr=1e-4)

        def step(i):
            x = torch.randn(8, 512, d, device=dev)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = layers(x).float().square().mean()
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        return step, 6
    if name == "llm_serve_varlen":
        # Serving with Hugging Face generate(): a GPT-2 (124M) in fp16 answers batches of
        # prompts of random sizes (1-16 prompts of 32-768 tokens), 32-128 new tokens each,
        # greedy, with its own KV cache
        from transformers import GPT2Config, GPT2LMHeadModel
        m = GPT2LMHeadModel(GPT2Config()).to(dev).half().eval()
        g = torch.Generator().manual_seed(5)

        @torch.no_grad()
        def step(i):
            b, t = int(torch.randint(1, 17, (1,), generator=g)), int(torch.randint(32, 769, (1,), generator=g))
            n = int(torch.randint(32, 129, (1,), generator=g))
            ids = torch.randint(0, 50257, (b, t), device=dev)
            m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
        return step, 8
    if name == "llm_generate_long":
        # Long generation with Hugging Face generate(): a 24-layer GPT-2 (d 1024) in fp16,
        # 8 prompts of 256 tokens, 512 new tokens each, greedy
        from transformers import GPT2Config, GPT2LMHeadModel
        m = GPT2LMHeadModel(GPT2Config(n_layer=24, n_embd=1024, n_head=16)).to(dev).half().eval()

        @torch.no_grad()
        def step(i):
            ids = torch.randint(0, 50257, (8, 256), device=dev)
            m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=512, min_new_tokens=512,
                       do_sample=False, pad_token_id=0)
        return step, 2
    if name == "diffusion_sampling":
        # Sampling from a small diffusion model: a conv denoiser with time embedding, 50
        # denoising steps on 16 images of 128x128, fp16, no grad; three batches
        def block(i, o):
            return torch.nn.Sequential(torch.nn.Conv2d(i, o, 3, padding=1), torch.nn.GroupNorm(8, o), torch.nn.SiLU(),
                                       torch.nn.Conv2d(o, o, 3, padding=1), torch.nn.GroupNorm(8, o), torch.nn.SiLU())

        class Denoiser(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.t = torch.nn.Sequential(torch.nn.Linear(1, 256), torch.nn.SiLU(), torch.nn.Linear(256, 256))
                self.d1, self.d2, self.d3 = block(3, 64), block(64, 128), block(128, 256)
                self.tp = torch.nn.Linear(256, 256)
                self.u2, self.u1 = block(256 + 128, 128), block(128 + 64, 64)
                self.out = torch.nn.Conv2d(64, 3, 1)

            def forward(self, x, t):
                p = torch.nn.functional.avg_pool2d
                up = lambda z: torch.nn.functional.interpolate(z, scale_factor=2)
                a = self.d1(x); b = self.d2(p(a, 2)); c = self.d3(p(b, 2))
                c = c + self.tp(self.t(t))[:, :, None, None]
                b = self.u2(torch.cat([up(c), b], 1))
                return self.out(self.u1(torch.cat([up(b), a], 1)))

        m = Denoiser().to(dev).half().eval()

        @torch.no_grad()
        def step(i):
            x = torch.randn(16, 3, 128, 128, device=dev, dtype=torch.half)
            for k in range(50, 0, -1):
                t = torch.full((16, 1), k / 50, device=dev, dtype=torch.half)
                x = x - 0.02 * m(x, t)
        return step, 3
    raise SystemExit("unknown workload " + name)


NAMES = ["transformer_lm_fp16", "unet_seg_train", "mlp_varbatch_infer", "t5_train", "lstm_varlen_train",
         "multiscale_cnn_train", "llm_decode_kvcache", "gan_train", "resnet_gradaccum_varbatch", "moe_train",
         "llm_serve_varlen", "llm_generate_long", "diffusion_sampling"]

if __name__ == "__main__":
    if sys.argv[1] == "one":
        sys.path.insert(0, sys.argv[5])
        import gen_traces
        gen_traces.workload = workload
        gen_traces.run_one(sys.argv[2], sys.argv[3], sys.argv[4] == "1")
    else:
        outdir = sys.argv[1]
        bench = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(HERE), "..", "..", "shared", "bench")
        names = sys.argv[3].split(",") if len(sys.argv) > 3 else NAMES
        for name in names:
            r = subprocess.run([sys.executable, HERE, "one", name, f"{outdir}/{name}.jsonl.gz", "1", bench],
                               capture_output=True, text=True, timeout=300)
            print(r.stdout.strip() or ("ERR " + name + " " + r.stderr[-800:]), flush=True)
