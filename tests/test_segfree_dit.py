"""Segmentation-free guidance and the segmentation map on joint attention: SD3/SD3.5 (MMDiT) and
Flux (double- and single-stream blocks), tiny models built with ComfyUI's own classes."""
from __future__ import annotations

import math

import pytest
import torch

import tiny_models

SETTINGS = dict(segfree_scale=10.0, segfree_cfg=2.0, attention_heads="mean over heads", candidates="prompt words")
PROMPT = "a cute maltese white dog, next to a cat"


@pytest.fixture(scope="module")
def models():
    return {"sd3": tiny_models.tiny_sd3(seed=0), "flux": tiny_models.tiny_flux(seed=0),
            "flux_dev": tiny_models.tiny_flux(seed=1, guidance_embed=True),
            "sd35": tiny_models.tiny_sd3(seed=2, x_block_self_attn_layers=[0]),
            "sd3_tiny_encoders": tiny_models.tiny_sd3(seed=0, adm_in_channels=tiny_models.SD3_TINY_POOLED)}


def conds(kind: str):
    family = "sd3" if kind.startswith("sd3") else "flux"
    positive, negative, other = (tiny_models.dit_conditioning(family, s) for s in (1, 2, 3))
    if kind == "flux_dev":  # FluxGuidance's distilled guidance value, in both prompts as the node puts it
        for c in (positive, negative, other):
            c[0][1]["guidance"] = 3.5
    return positive, negative, other


def ksample(comfy_nodes, model, positive, negative, cfg=5.0, steps=3, seed=7, latent=None):
    latent = latent if latent is not None else {"samples": torch.zeros(1, 16, 8, 8)}
    (out,) = comfy_nodes.common_ksampler(model, seed, steps, cfg, "euler", "simple", positive, negative, latent, denoise=1.0)
    return out["samples"]


def run_node(node_cls, **kwargs):
    return node_cls.execute(**kwargs).result


def fingerprint(model_patcher) -> str:
    return tiny_models.fingerprint(model_patcher.model.diffusion_model, patcher=model_patcher)


# ---------------------------------------------------------------------------------------------
# The edit on joint attention, against a hand computation with the full softmax

def hand_joint(q, k, v, text: slice, image: slice, a, candidates, words, per_head=False):
    """Full (L x L) softmax per head in float64; for each image query the most-attended candidate
    text key (head-averaged or per head) and its word get weight times -a; nothing else changes."""
    b, heads, length, d = q.shape
    w = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(d), dim=-1)
    edited = w.clone()
    t0 = text.start
    for bi in range(b):
        for p in range(image.start, image.stop):
            for h in range(heads):
                scores = w[bi, h, p, text] if per_head else w[bi, :, p, text].mean(0)
                scores = scores.masked_fill(~candidates, -1.0)
                best = int(scores.argmax())
                for j in range(text.stop - text.start):
                    if j == best or (words[best] > 0 and words[j] == words[best]):
                        edited[bi, h, p, t0 + j] = -a * w[bi, h, p, t0 + j]
    return edited @ v.double(), w


@pytest.mark.parametrize("text_first", [True, False])
@pytest.mark.parametrize("per_head", [False, True])
def test_joint_edit_matches_hand_computation(sf, text_first, per_head):
    g = torch.Generator().manual_seed(0)
    b, heads, d, n_text, n_image = 2, 3, 8, 7, 10
    q, k, v = (torch.randn(b, heads, n_text + n_image, d, generator=g) for _ in range(3))
    text = slice(0, n_text) if text_first else slice(n_image, n_image + n_text)
    image = slice(n_text, n_text + n_image) if text_first else slice(0, n_image)
    candidates = torch.tensor([True, True, True, False, True, True, False])  # T5: no BOS; 3 = end, 6 = pad
    words = torch.tensor([1, 2, 2, 0, 3, 4, 0])
    token_map = sf.TokenMap(candidates, words)
    got = sf.joint_segfree_attention(q, k, v, text, image, 10.0, token_map, per_head)
    want, full = hand_joint(q, k, v, text, image, 10.0, candidates, words, per_head)
    assert torch.allclose(got.double(), want, atol=1e-5), (got.double() - want).abs().max()
    # text queries and the image-to-image weights are untouched: text rows are plain attention
    plain = sf.sdpa(q, k, v)
    assert torch.allclose(got[:, :, text], plain[:, :, text], atol=1e-6)
    assert not torch.allclose(got[:, :, image], plain[:, :, image], atol=1e-3)
    # the image-to-text block of the full softmax, without building it
    weights = sf.image_to_text_weights(q, k, text, image)
    assert torch.allclose(weights.double(), full[:, :, image, text], atol=1e-6)


def test_identity_scale_is_plain_attention(sf):
    """a = -1 multiplies the selected weight by 1: the modified attention is the plain one."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 12, 4, generator=g) for _ in range(3))
    token_map = sf.default_token_map(5, None)
    out = sf.joint_segfree_attention(q, k, v, slice(0, 5), slice(5, 12), -1.0, token_map)
    assert torch.equal(out, sf.sdpa(q, k, v))


def spy_override(seen: list):
    """Another pack's attention override: records the joint calls it sees, then runs ComfyUI's attention."""
    def override(func, *args, **kwargs):
        seen.append((args[0].shape, kwargs.get("skip_reshape", False), list(kwargs["transformer_options"].get("cond_or_uncond", []))))
        return func(*args, **kwargs)
    return override


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_installed_hook_edits_only_the_uncond_chunk_of_the_block(comfy_nodes, glue, sf, models, kind):
    """Through ComfyUI's forward with the installed dit replacement and attention override: the
    block's joint attention for the chunk marked uncond is the hand computation on the q, k, v
    the model built, and the cond chunk is the model's own attention, bit for bit."""
    model = models[kind]
    patched = glue.install_attention_hook(model, "test")
    captured = []

    def capture(func, *args, **kwargs):
        out = func(*args, **kwargs)
        captured.append((args, dict(kwargs), out.clone()))
        return out

    patched.model_options["transformer_options"]["optimized_attention_override"] = capture
    token_map = sf.TokenMap(torch.ones(40, dtype=torch.bool), torch.arange(1, 41))
    step = glue.SegfreeStep(10.0, False, {"u1": token_map})
    net = patched.model.diffusion_model
    family = "sd3" if kind == "sd3" else "flux"
    context = torch.cat([tiny_models.dit_conditioning(family, 1, tokens=40)[0][0]] * 2)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    options = {**patched.model_options["transformer_options"], "cond_or_uncond": [0, 1], "uuids": ["u0", "u1"],
               glue.SEGFREE_KEY: step}
    edited_outputs = []
    inner_override = glue.make_attention_override

    def recording_override(previous=None):
        ours = inner_override(previous)

        def wrapped(func, *args, **kwargs):
            out = ours(func, *args, **kwargs)
            edited_outputs.append(out.clone())
            return out
        return wrapped

    glue.joint_attention.make_attention_override = recording_override
    try:
        with torch.no_grad():
            if kind == "sd3":
                net(x, torch.tensor([0.5, 0.5]), context=context, y=torch.zeros(2, 2048), transformer_options=options)
            else:
                net(x, torch.tensor([0.5, 0.5]), context, y=torch.zeros(2, 32), transformer_options=options)
    finally:
        glue.joint_attention.make_attention_override = inner_override
    assert captured and edited_outputs
    args, kwargs, plain = captured[0]  # the first double block: the other pack's override saw it, ours edited it
    q, k, v = args[:3]
    heads = args[3] if len(args) > 3 else kwargs["heads"]
    to_heads = (lambda t: t) if kwargs.get("skip_reshape") else (lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2))
    q, k, v = to_heads(q), to_heads(k), to_heads(v)
    n_image = q.shape[2] - 40
    want, _ = hand_joint(q[1:], k[1:], v[1:], slice(0, 40), slice(40, 40 + n_image), 10.0, token_map.candidates, token_map.words)
    got = edited_outputs[0]
    got_heads = got.reshape(got.shape[0], got.shape[1], heads, -1).transpose(1, 2)
    assert torch.equal(got[:1], plain[:1])  # the positive prompt's chunk: the model's own attention
    assert torch.allclose(got_heads[1:].double(), want, atol=1e-4), (got_heads[1:].double() - want).abs().max()


# ---------------------------------------------------------------------------------------------
# Sampling through ComfyUI's KSampler: the switch, eq. 11, the user's model

@pytest.mark.parametrize("kind", ["sd3", "flux", "flux_dev", "sd35"])
def test_start_percent_one_is_plain_cfg_bit_for_bit(comfy_nodes, nodes_sf, models, kind):
    positive, negative, _ = conds(kind)
    (patched, _) = run_node(nodes_sf.SegmentationFreeGuidance, model=models[kind], start_percent=1.0,
                            joint_blocks="double- and single-stream blocks", **SETTINGS)
    for cfg in (5.0, 1.0):
        assert torch.equal(ksample(comfy_nodes, models[kind], positive, negative, cfg=cfg),
                           ksample(comfy_nodes, patched, positive, negative, cfg=cfg))


@pytest.mark.parametrize("kind", ["sd3", "flux", "flux_dev", "sd35"])
def test_after_switch_result_is_eq_11_and_independent_of_the_negative(comfy_nodes, glue, models, kind):
    model = models[kind]
    positive, negative, other = conds(kind)
    patched = glue.apply_segfree_guidance(model, glue.SegfreeSettings(start_percent=0.0), "test")
    a = ksample(comfy_nodes, patched, positive, negative, cfg=4.0)
    b = ksample(comfy_nodes, patched, positive, other, cfg=9.0)
    assert torch.allclose(a, b, atol=1e-5)
    plain = ksample(comfy_nodes, model, positive, negative, cfg=3.0)
    assert (a - plain).abs().max() > 1e-2  # it is not CFG
    # a = -1 makes the edit the identity: ε̄ = ε, eq. 11 gives ε, the cond-only (cfg 1) result
    identity = glue.apply_segfree_guidance(model, glue.SegfreeSettings(segfree_scale=-1.0, segfree_cfg=5.0, start_percent=0.0), "test")
    cond_only = ksample(comfy_nodes, model, positive, negative, cfg=1.0)
    assert torch.allclose(ksample(comfy_nodes, identity, positive, negative, cfg=7.0), cond_only, atol=1e-4)


def test_flux_dev_at_cfg_one_still_runs_the_modified_pass(comfy_nodes, glue, models):
    """Flux-dev users sample at cfg 1 (distilled guidance): ComfyUI then skips the negative;
    after the switch the ε̄ pass must run anyway, and eq. 11 with segfree_cfg applies."""
    model = models["flux_dev"]
    positive, negative, _ = conds("flux_dev")
    patched = glue.apply_segfree_guidance(model, glue.SegfreeSettings(start_percent=0.5), "test")
    seen = []
    previous = patched.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 0)]

    def counting(args, extra):
        seen.append(list(args["transformer_options"]["cond_or_uncond"]))
        return previous(args, extra)

    patched.set_model_patch_replace(counting, "dit", "double_block", 0)
    out = ksample(comfy_nodes, patched, positive, negative, cfg=1.0, steps=4)
    assert [0] in seen  # before the switch: one pass, as plain cfg 1
    assert [0, 1] in [sorted(c) for c in seen]  # after: the positive and the modified pass
    plain = ksample(comfy_nodes, model, positive, negative, cfg=1.0, steps=4)
    assert (out - plain).abs().max() > 1e-3
    # the early steps are plain cfg-1 steps, bit for bit
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    early = [comfy_nodes.common_ksampler(m, 7, 4, 1.0, "euler", "simple", positive, negative, latent, start_step=0, last_step=1,
                                         force_full_denoise=False)[0]["samples"] for m in (model, patched)]
    assert torch.equal(*early)


def test_single_stream_option(comfy_nodes, glue, nodes_sf, models):
    model = models["flux"]
    positive, negative, _ = conds("flux")
    double = glue.apply_segfree_guidance(model, glue.SegfreeSettings(start_percent=0.0), "test")
    both = glue.apply_segfree_guidance(model, glue.SegfreeSettings(start_percent=0.0, single_blocks=True), "test")
    replaced = lambda m: set(m.model_options["transformer_options"]["patches_replace"]["dit"])  # noqa: E731
    assert replaced(double) == {("double_block", 0)}
    assert replaced(both) == {("double_block", 0), ("single_block", 0)}
    a, b = (ksample(comfy_nodes, m, positive, negative) for m in (double, both))
    assert (a - b).abs().max() > 1e-4
    # SD3 has no single-stream blocks: the option changes nothing there
    sd3 = models["sd3"]
    p3, n3, _ = conds("sd3")
    assert torch.equal(*(ksample(comfy_nodes, glue.apply_segfree_guidance(sd3, glue.SegfreeSettings(start_percent=0.0, single_blocks=s), "t"),
                                 p3, n3) for s in (False, True)))


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_wraps_another_packs_dit_patch_and_override(comfy_nodes, nodes_sf, models, kind):
    model = models[kind]
    positive, negative, _ = conds(kind)
    seen_blocks, seen_attention = [], []

    def other_pack(args, extra):
        seen_blocks.append(list(args["transformer_options"]["cond_or_uncond"]))
        return extra["original_block"](args)

    other = model.clone()
    other.set_model_patch_replace(other_pack, "dit", "double_block", 0)
    other.model_options["transformer_options"]["optimized_attention_override"] = spy_override(seen_attention)
    (patched, _) = run_node(nodes_sf.SegmentationFreeGuidance, model=other, start_percent=0.5, **SETTINGS)
    out = ksample(comfy_nodes, patched, positive, negative, steps=4)
    assert torch.isfinite(out).all()
    assert len(seen_blocks) == 4 and all(sorted(c) == [0, 1] for c in seen_blocks)  # kept, every step
    assert seen_attention and all(sorted(c[2]) == [0, 1] for c in seen_attention)
    before = fingerprint(model)
    assert "dit" not in str(model.model_options) and fingerprint(model) == before


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_user_model_unchanged(comfy_nodes, nodes_sf, models, kind):
    model = models[kind]
    before = fingerprint(model)
    positive, negative, _ = conds(kind)
    (patched, _) = run_node(nodes_sf.SegmentationFreeGuidance, model=model, start_percent=0.0, **SETTINGS)
    ksample(comfy_nodes, patched, positive, negative, steps=2)
    assert fingerprint(model) == before
    assert "sampler_calc_cond_batch_function" not in model.model_options
    assert "patches_replace" not in model.model_options.get("transformer_options", {})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(comfy_nodes, glue, dtype):
    model = tiny_models.tiny_flux(seed=3, dtype=dtype)
    positive, negative, _ = conds("flux")
    out = ksample(comfy_nodes, glue.apply_segfree_guidance(model, glue.SegfreeSettings(start_percent=0.0), "test"), positive, negative, steps=2)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# Token maps: the SD3 (CLIP-L, CLIP-G, T5-XXL) and Flux (T5-XXL) contexts

@pytest.fixture(scope="module")
def flux_clip():
    return tiny_models.tiny_dit_clip("flux", seed=4)


@pytest.fixture(scope="module")
def sd3_clip():
    return tiny_models.tiny_dit_clip("sd3", seed=5)


def test_flux_token_map_is_t5_words(glue, flux_clip):
    clip = glue.clip_with_token_maps(flux_clip)
    cond = tiny_models.encode(clip, PROMPT)
    context, extra = cond[0]
    token_map = extra[glue.TOKEN_MAP_KEY]
    assert token_map.candidates.shape[0] == context.shape[1] == 256  # T5 padded to 256 for Flux
    words = glue.prompt_words(flux_clip.tokenizer, flux_clip.tokenize(PROMPT))
    assert words == ["a", "cute", "maltese", "white", "dog,", "next", "to", "a", "cat"]
    assert int(token_map.words.max()) == len(words)
    n = int(token_map.candidates.sum())
    assert token_map.candidates[:n].all() and not token_map.candidates[n:].any()  # no BOS; end and padding excluded
    assert token_map.words[0] == 1  # T5's first token is a word (there is no BOS)
    assert int((token_map.words == 3).sum()) > 1  # "maltese" is several SentencePiece pieces, one word
    assert token_map.including_specials().candidates.all()  # with end/padding: every position
    weighted = tiny_models.encode(clip, "a cute (maltese:1.3) white dog, next to a cat")[0][1][glue.TOKEN_MAP_KEY]
    assert torch.equal(weighted.words, token_map.words) and torch.equal(weighted.candidates, token_map.candidates)
    long_prompt = ", ".join(["a red circle to the left of a small blue square"] * 30)
    long_cond = tiny_models.encode(clip, long_prompt)
    assert long_cond[0][0].shape[1] > 256 and long_cond[0][1][glue.TOKEN_MAP_KEY].candidates.shape[0] == long_cond[0][0].shape[1]


def test_sd3_token_map_clip_then_t5_with_shared_words(glue, sd3_clip):
    clip = glue.clip_with_token_maps(sd3_clip)
    context, extra = tiny_models.encode(clip, PROMPT)[0]
    token_map = extra[glue.TOKEN_MAP_KEY]
    assert context.shape[1] == token_map.candidates.shape[0] == 154  # 77 CLIP-L/G positions, then 77 T5
    clip_part, t5_part = token_map.words[:77], token_map.words[77:]
    assert not token_map.candidates[0] and not token_map.including_specials().candidates[0]  # CLIP's BOS never
    assert token_map.candidates[77]  # T5 has none
    # the same words in both encoders' tokens share an index ("dog," is "dog" + "," in CLIP, one T5 word)
    assert set(clip_part[clip_part > 0].tolist()) == set(t5_part[t5_part > 0].tolist()) == set(range(1, 10))
    long_prompt = ", ".join(["a red circle to the left of a small blue square"] * 9)
    long_context, long_extra = tiny_models.encode(clip, long_prompt)[0]
    assert long_context.shape[1] == long_extra[glue.TOKEN_MAP_KEY].candidates.shape[0] > 154
    assert not long_extra[glue.TOKEN_MAP_KEY].candidates[:154:77].any()  # each CLIP chunk's BOS


def test_sd3_end_to_end_with_tiny_encoders(comfy_nodes, nodes_sf, glue, models, sd3_clip):
    (patched, clip) = run_node(nodes_sf.SegmentationFreeGuidance, model=models["sd3_tiny_encoders"], clip=sd3_clip, start_percent=0.0, **SETTINGS)
    positive = tiny_models.encode(clip, PROMPT)
    negative = tiny_models.encode(sd3_clip, "blurry")
    seen = []
    previous = patched.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 0)]

    def recording(args, extra):
        step = args["transformer_options"].get(glue.SEGFREE_KEY)
        if step is not None:
            seen.extend(step.token_maps.values())
        return previous(args, extra)

    patched.set_model_patch_replace(recording, "dit", "double_block", 0)
    out = ksample(comfy_nodes, patched, positive, negative, steps=2)
    assert torch.isfinite(out).all() and seen
    assert all(torch.equal(m.words.cpu(), positive[0][1][glue.TOKEN_MAP_KEY].words) for m in seen)


# ---------------------------------------------------------------------------------------------
# The segmentation map

@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_segmentation_map(nodes_sf, models, flux_clip, sd3_clip, kind, artifacts):
    clip = sd3_clip if kind == "sd3" else flux_clip
    model = models["sd3_tiny_encoders" if kind == "sd3" else "flux"]
    latent = {"samples": torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(0))}
    image, masks, words = run_node(nodes_sf.SegmentationMap, model=model, clip=clip, text="a red circle and a blue square",
                                   samples=latent, start_percent=0.2, end_percent=0.8, probes=2, seed=1)
    words = words.split("\n")
    assert words == ["a", "red", "circle", "and", "a", "blue", "square"]
    assert masks.shape == (len(words), 64, 96)
    assert torch.equal(masks.sum(0), torch.ones(64, 96))  # every pixel belongs to exactly one word
    from PIL import Image
    Image.fromarray((image[0].numpy() * 255).astype("uint8")).save(artifacts / f"segmentation_map_{kind}.png")


# ---------------------------------------------------------------------------------------------
# Other families ComfyUI 0.3.75 loads: a refusal naming the family

def tiny_family(name: str):
    """A tiny instance of a family's network, built with ComfyUI's own config class."""
    import comfy.model_patcher
    import comfy.supported_models

    configs = {
        "AuraFlow": {"in_channels": 4, "out_channels": 4, "patch_size": 2, "dim": 64, "n_layers": 2, "n_double_layers": 1,
                     "n_heads": 2, "global_conddim": 64, "cond_seq_dim": 32, "max_seq": 64},
        "Lumina2": {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": 32, "n_layers": 1,
                    "n_heads": 2, "n_kv_heads": 2, "n_refiner_layers": 1, "axes_dims": [8, 12, 12], "axes_lens": [300, 64, 64],
                    "qk_norm": True},
    }
    config = getattr(comfy.supported_models, name)(configs[name])
    model = config.get_model({})
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


@pytest.mark.parametrize("family", ["AuraFlow", "Lumina2"])
def test_other_families_are_refused_by_name(nodes_sf, glue, family):
    model = tiny_family(family)
    for node in (nodes_sf.SegmentationFreeGuidance,):
        with pytest.raises(glue.NodeInputError, match=f"MC_SegmentationFreeGuidance: input 'model': {family} models are not supported"):
            run_node(node, model=model, start_percent=0.4, **SETTINGS)
    with pytest.raises(glue.NodeInputError, match=f"{family} models are not supported"):
        glue.record_segmentation(model, [[torch.zeros(1, 8, 32), {}]], torch.zeros(1, 16, 8, 8), 0.2, 0.8, 1, 0, "MC_SegmentationMap")


def test_every_attention_family_has_an_answer(glue):
    """Every family in ComfyUI's supported_models list whose network reads text through
    attention is either wired (UNets, SD3, Flux) or refused by name."""
    import comfy.supported_models

    unets = {"SD15", "SD20", "SD21UnclipL", "SD21UnclipH", "SDXL", "SDXLRefiner", "SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B",
             "SD15_instructpix2pix", "SDXL_instructpix2pix", "LotusD", "SD_X4Upscaler", "Stable_Zero123", "SV3D_u", "SV3D_p",
             "SVD_img2vid"}
    video_audio_3d = {"StableAudio", "GenmoMochi", "LTXV", "HunyuanVideo", "HunyuanVideoI2V", "HunyuanVideoSkyreelsI2V",
                      "HunyuanVideo15", "HunyuanVideo15_SR_Distilled", "CosmosT2V", "CosmosI2V", "CosmosI2VPredict2", "WAN21_T2V",
                      "WAN22_T2V", "WAN21_I2V", "WAN21_FunControl2V", "WAN21_Vace", "WAN21_Camera", "WAN22_Camera", "WAN22_S2V",
                      "WAN21_HuMo", "WAN22_Animate", "Hunyuan3Dv2", "Hunyuan3Dv2mini", "Hunyuan3Dv2_1", "ACEStep"}
    families = {cls.__name__ for cls in comfy.supported_models.models}
    answered = unets | video_audio_3d | set(glue.JOINT_FAMILIES) | set(glue.UNSUPPORTED_FAMILIES)
    assert families <= answered, families - answered
