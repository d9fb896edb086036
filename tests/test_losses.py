"""Alignment objectives on hand-built tensors: known values, masks, gradients, and the cross-rank gather."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import free_port

from mer_dist.config import ConfigError, LossTerm, parse_loss
from mer_dist.train.losses import (
    AlignmentObjective,
    confidence,
    infonce_loss,
    kd_loss,
    regression_loss,
)


def test_regression_known_values_and_mask():
    pred = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [9.0, 9.0]]])
    target = torch.tensor([[[0.0, 0.0], [0.0, 2.0], [0.0, 0.0]]])
    valid = torch.tensor([[True, True, False]])                    # the third frame is audio padding
    loss, _ = regression_loss(pred, target, valid, "mse", frame_weight=1.0, utterance_weight=0.0)
    assert loss.item() == pytest.approx((0.5 + 2.0) / 2)          # mean over dims, then over valid frames
    # utterance part: means over valid frames (0.5, 0) vs (0, 1) -> mse 0.625
    loss_u, _ = regression_loss(pred, target, valid, "mse", frame_weight=0.0, utterance_weight=1.0)
    assert loss_u.item() == pytest.approx((0.25 + 1.0) / 2)
    # changing a masked frame changes nothing
    pred2 = pred.clone()
    pred2[0, 2] = -100
    assert regression_loss(pred2, target, valid, "mse")[0].item() == regression_loss(pred, target, valid, "mse")[0].item()
    cos_loss, cos = regression_loss(target + 0.0, target * 3, torch.tensor([[True, True, False]]), "cosine", 1.0, 0.0)
    assert cos.item() == pytest.approx(0.5) and cos_loss.item() == pytest.approx(0.5)   # frame 0 is a zero vector


def test_kd_known_value_temperature_and_confidence():
    t = torch.tensor([[[2.0, 0.0, 0.0]]])
    s = torch.zeros(1, 1, 3)
    valid = torch.ones(1, 1, dtype=torch.bool)
    tau = 2.0
    pt = F.softmax(t / tau, -1)
    expected = (pt * (pt.log() - math.log(1 / 3))).sum() * tau ** 2
    loss, agree = kd_loss(s, t, valid, tau=tau, utterance_weight=0.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert kd_loss(t, t, valid, tau=tau)[0].item() == pytest.approx(0.0, abs=1e-6)    # student == teacher
    # confidence: flat posterior -> 0, peaked -> close to 1; weighting ignores the flat frame
    assert confidence(torch.zeros(1, 3)).item() == pytest.approx(0.0, abs=1e-6)
    assert confidence(torch.tensor([[50.0, 0, 0]])).item() > 0.99
    t2 = torch.tensor([[[5.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    s2 = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 9.0, 0.0]]])
    v2 = torch.ones(1, 2, dtype=torch.bool)
    only_first, _ = kd_loss(s2[:, :1], t2[:, :1], v2[:, :1], utterance_weight=0.0)
    weighted, _ = kd_loss(s2, t2, v2, utterance_weight=0.0, confidence_weighting=True)
    assert weighted.item() == pytest.approx(only_first.item(), rel=1e-4)
    assert kd_loss(s2, t2, v2, utterance_weight=0.0)[0].item() != pytest.approx(weighted.item(), rel=1e-2)


def test_kd_masked_frames_and_gradient_flow():
    torch.manual_seed(0)
    s = torch.randn(2, 4, 6, requires_grad=True)
    t = torch.randn(2, 4, 6)
    valid = torch.tensor([[True, True, True, False], [True, False, False, False]])
    loss, _ = kd_loss(s, t, valid)
    loss.backward()
    assert s.grad[~valid].abs().max() == 0 and s.grad[valid].abs().min() > 0     # padding frames get no gradient


def test_infonce_perfect_pairs_and_temperature():
    e = torch.eye(4)
    lo, acc = infonce_loss(e, e, torch.tensor([math.log(100.0)]), gather=False)
    assert acc.item() == 1.0 and lo.item() < 1e-3
    hi, acc2 = infonce_loss(e, e.roll(1, 0), torch.tensor([math.log(100.0)]), gather=False)
    assert acc2.item() == 0.0 and hi.item() > 10
    # uniform similarities: the loss is log(batch)
    flat, _ = infonce_loss(torch.ones(4, 2), torch.ones(4, 2), torch.zeros(1), gather=False)
    assert flat.item() == pytest.approx(math.log(4), rel=1e-5)


def test_objective_gradients_reach_only_what_they_should():
    torch.manual_seed(0)
    obj = AlignmentObjective([LossTerm("kd", 1.0)], width=8, num_classes=6)
    emb = torch.randn(3, 5, 8, requires_grad=True)
    teacher_logits = torch.randn(3, 5, 6, requires_grad=True)     # the teacher is frozen: no grad may reach it
    loss, stats = obj(emb, {"valid": torch.ones(3, 5, dtype=torch.bool), "logits": teacher_logits * 1.0})
    loss.backward()
    assert emb.grad.abs().sum() > 0 and obj.kd_head.weight.grad.abs().sum() > 0
    assert teacher_logits.grad is None        # the objective detached it; without that it would hold a gradient
    assert obj.needs == {"logits"} and set(stats) == {"kd_agree", "loss_kd"}
    both = AlignmentObjective(parse_loss(["kd", "infonce:0.5"]), width=8, num_classes=6, audio_dim=4)
    assert both.needs == {"logits", "clip"} and both.regress is None
    target = {"valid": torch.ones(3, 5, dtype=torch.bool), "logits": torch.randn(3, 5, 6), "clip": torch.randn(3, 4)}
    target["clip"].requires_grad_(True)
    total, st = both(emb, target)
    total.backward()
    assert target["clip"].grad is None and target["logits"].grad is None
    assert total.item() == pytest.approx((st["loss_kd"] + 0.5 * st["loss_infonce"]).item(), rel=1e-5)


def test_parse_loss_rejects_bad_specs():
    assert parse_loss(["kd", "infonce:0.5"]) == [LossTerm("kd", 1.0), LossTerm("infonce", 0.5)]
    for bad in (["l1"], ["kd:x"], ["kd:-1"], ["kd", "kd"], ["mse", "cosine"], []):
        with pytest.raises(ConfigError, match="config key 'loss'"):
            parse_loss(bad)


def _gather_worker(rank: int, world: int, port: int, video: torch.Tensor, audio: torch.Tensor, q) -> None:
    import torch.distributed as tdist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    b = len(video) // world
    v = video[rank * b:(rank + 1) * b].clone().requires_grad_(True)
    a = audio[rank * b:(rank + 1) * b].clone().requires_grad_(True)
    loss, _ = infonce_loss(v, a, torch.zeros(1), gather=True)
    loss.backward()
    losses = [torch.zeros(1) for _ in range(world)]
    tdist.all_gather(losses, loss.detach().view(1))
    # numpy (pickled by value): a tensor would travel as a shared-memory handle that dies with this process
    q.put((rank, float(torch.cat(losses).mean()), (v.grad / world).numpy(), (a.grad / world).numpy()))
    tdist.destroy_process_group()


@pytest.mark.slow
def test_infonce_gather_across_two_ranks_equals_one_big_batch():
    torch.manual_seed(0)
    video, audio = torch.randn(8, 5), torch.randn(8, 5)
    v, a = video.clone().requires_grad_(True), audio.clone().requires_grad_(True)
    ref, _ = infonce_loss(v, a, torch.zeros(1), gather=False)
    ref.backward()
    ctx = torch.multiprocessing.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_gather_worker, args=(r, 2, port, video, audio, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict((r, (lo, gv, ga)) for r, lo, gv, ga in (q.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(60)
    assert got[0][0] == pytest.approx(ref.item(), rel=1e-5) and got[1][0] == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(torch.from_numpy(np.concatenate([got[0][1], got[1][1]])), v.grad, atol=1e-6)
    assert torch.allclose(torch.from_numpy(np.concatenate([got[0][2], got[1][2]])), a.grad, atol=1e-6)


def test_pseudo_term_learns_only_from_clips_with_a_pseudo_label():
    torch.manual_seed(0)
    obj = AlignmentObjective([LossTerm("pseudo", 1.0)], width=8, num_classes=6)
    assert obj.needs == {"pseudo"} and obj.kd_head is None
    emb = torch.randn(3, 5, 8, requires_grad=True)
    probs = torch.softmax(torch.randn(3, 6), -1)
    weight = torch.tensor([1.0, 0.0, 1.0])                 # clip 1 has no pseudo-label
    loss, stats = obj(emb, {"valid": torch.ones(3, 5, dtype=torch.bool), "pseudo": probs, "pseudo_weight": weight})
    logits = obj.pseudo_head(emb.mean(1))
    expected = -(probs[[0, 2]] * logits[[0, 2]].log_softmax(-1)).sum(-1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert stats["pseudo_agree"].item() == pytest.approx(
        (logits[[0, 2]].argmax(-1) == probs[[0, 2]].argmax(-1)).float().mean().item())
    loss.backward()
    assert emb.grad[1].abs().sum() == 0 and emb.grad[0].abs().sum() > 0      # no label, no gradient
    none, st = obj(emb, {"valid": torch.ones(3, 5, dtype=torch.bool), "pseudo": probs,
                         "pseudo_weight": torch.zeros(3)})
    assert none.item() == 0.0 and st["pseudo_agree"].item() == 0.0          # a batch without any: 0, not NaN


def test_pseudo_loss_and_pseudo_dir_come_together():
    from mer_dist.config import AlignConfig, PseudoConfig
    with pytest.raises(ConfigError, match="config key 'pseudo'"):
        AlignConfig(loss=["infonce", "pseudo"])
    with pytest.raises(ConfigError, match="config key 'pseudo'"):
        AlignConfig(loss=["infonce"], pseudo=PseudoConfig(dir="runs/pseudo"))
    cfg = AlignConfig(loss=["infonce", "pseudo:0.5"], pseudo=PseudoConfig(dir="runs/pseudo"))      # together: the head exists
    obj = AlignmentObjective(parse_loss(cfg.loss), 8, audio_dim=4)
    assert obj.pseudo_head is not None and [t.weight for t in obj.terms if t.kind == "pseudo"] == [0.5]


def _views(**kw):
    from mer_dist.config import ViewsConfig
    from mer_dist.train.augment import ClipAugment
    return ClipAugment(ViewsConfig(**kw))


def test_clip_views_identity_flip_and_timing():
    """Each draw holds for a whole clip: with every augmentation off a view is the clip itself; a flip mirrors
    every frame of a clip or none; a view's frames run forward in time over a span of the clip; the module holds
    no tensor (`.to(device)` has nothing to move)."""
    torch.manual_seed(0)
    clips = torch.randint(0, 256, (16, 4, 3, 12, 12), dtype=torch.uint8)
    off = _views(min_scale=1.0, min_span=1.0, flip=False, colour=0.0, grey=0.0)
    assert not list(off.parameters()) and not list(off.buffers())
    same = off(clips)
    assert same.dtype == torch.float32 and torch.allclose(same, clips.float(), atol=1e-3)
    flipped = _views(min_scale=1.0, min_span=1.0, flip=True, colour=0.0, grey=0.0)(clips)
    mirror = torch.allclose(flipped, clips.float().flip(-1), atol=1e-3, rtol=0)
    per_clip = [torch.allclose(flipped[i], clips[i].float().flip(-1), atol=1e-3) for i in range(16)]
    kept = [torch.allclose(flipped[i], clips[i].float(), atol=1e-3) for i in range(16)]
    assert all(a != b for a, b in zip(per_clip, kept)) and 0 < sum(per_clip) < 16 and not mirror
    ramp = torch.arange(8, dtype=torch.uint8).mul(30).view(1, 8, 1, 1, 1).expand(32, 8, 3, 6, 6).contiguous()
    timed = _views(min_scale=1.0, min_span=0.5, flip=False, colour=0.0, grey=0.0)(ramp)[:, :, 0, 0, 0] / 30
    assert (timed.diff(dim=1) >= 0).all()                                          # never backwards
    assert ((timed[:, -1] - timed[:, 0]) >= 3).all() and (timed[:, -1] - timed[:, 0] < 7).any()   # a span >= half
    crops = _views()(clips[:1].expand(8, -1, -1, -1, -1))
    assert not torch.allclose(crops[0], crops[1]) and crops.min() >= 0 and crops.max() <= 255


def test_views_term_trains_an_encoder_to_tell_clips_apart_without_a_teacher():
    """Loss `views` alone, default augmentation: no teacher output is read, gradients reach the encoder through
    both views, and training makes two views of one clip find each other among the batch's other clips far more
    often than the untrained encoder does (16 grey 3x3 layouts, which colour jitter cannot tell apart)."""
    from mer_dist.config import ViewsConfig, VisualConfig
    from mer_dist.models.visual import VisualEncoder
    from mer_dist.train.align import Aligner
    from mer_dist.train.augment import ClipAugment
    torch.manual_seed(0)
    enc = VisualEncoder(VisualConfig(backbone="tiny:vit"), 16)
    obj = AlignmentObjective(parse_loss(["views"]), width=enc.width, embed_dim=32)
    assert obj.needs == {"views"}
    model = Aligner(enc, obj, ClipAugment(ViewsConfig()))
    layouts = torch.randint(0, 256, (16, 1, 1, 3, 3)).float().expand(16, 1, 3, 3, 3).flatten(0, 1)
    clips = F.interpolate(layouts, size=(16, 16), mode="nearest").view(16, 1, 3, 16, 16).expand(16, 4, 3, 16, 16)
    clips = clips.round().to(torch.uint8)

    def retrieval() -> float:
        model.eval()
        with torch.no_grad():
            acc = np.mean([model(clips, {})[1]["views_acc"].item() for _ in range(10)])
        model.train()
        return acc

    before = retrieval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(100):
        loss, stats = model(clips, {})
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert set(stats) == {"loss_views", "views_acc"}
    assert enc.backbone.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0
    after = retrieval()
    assert after > before + 0.15, (before, after)


def test_views_alone_needs_no_teacher(tmp_path):
    """A views-only alignment never loads the teacher: the target function works without one."""
    from mer_dist.config import AlignConfig
    from mer_dist.train.align import target_fn
    cfg = AlignConfig(loss=["views"], teacher=str(tmp_path / "no-teacher"))
    targets = target_fn(cfg, torch.device("cpu"), {"views"}, {"views"})
    assert targets({"name": ["a"]}) == {} and targets.teacher() is None
    with pytest.raises(Exception):
        target_fn(AlignConfig(teacher=str(tmp_path / "no-teacher")), torch.device("cpu"), {"clip"}, {"infonce"})
