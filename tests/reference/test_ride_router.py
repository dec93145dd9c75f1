"""RIDE's expert router (expert assignment) against a transcription of the authors' code.

Reference: github:frank-xwang/RIDE-LongTailRecognition, ``model/ldam_drw_resnets/ea_resnet_cifar.py``, read, not
imported: ``ResNet_s.pred_expert_help`` (pool, L2-normalise, hidden linear + ReLU, ``topk`` of the running mean
logits, ``cat((topk, feature))``, the shared output layer) and ``ResNet_s.forward`` (with ``target``: running sums,
``correctness``, ``BCE(pos_weight)`` on ``~correct_i & any(correct_{i+1:})`` averaged over ``E - 1``; without: routing
while ``sigmoid > 0.5``, later experts only on the routed samples, the mean over the experts used). The reference
works on the experts' outputs for every sample (an expert's output for a sample does not depend on the others in
eval mode); the library computes the later experts on the routed samples only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_lt.nets import MultiExpertCIFARResNet
from lightning_lt.nets.experts import ExpertRouter


def official_pred_expert_help(params, top_choices, pooled, logits, i):
    """``pred_expert_help((feature, logits), i)`` with ``share_expert_help_pred_fc=True``; ``params`` holds the hidden
    layers' and the output layer's weights and biases."""
    feature = pooled / pooled.norm(dim=1, keepdim=True)
    feature = F.relu(F.linear(feature, params["hidden_w"][i], params["hidden_b"][i]))
    topk, _ = torch.topk(logits, k=top_choices, dim=1)
    confidence_input = torch.cat((topk, feature), dim=1)
    return F.linear(confidence_input, params["out_w"], params["out_b"])


def official_training_loss(params, top_choices, pos_weight, pooled, logits, target):
    """``ResNet_s.forward(x, target)``: the router loss (``output`` sums the experts' scaled logits)."""
    num_experts, batch = logits.shape[:2]
    output = logits.new_zeros(logits.shape[1:])
    preds = output.new_zeros((batch, num_experts - 1))
    correctness = output.new_zeros((batch, num_experts), dtype=torch.bool)
    loss = output.new_zeros((1,))
    for i in range(num_experts):
        output = output + logits[i]
        correctness[:, i] = output.argmax(dim=1) == target
        if i != num_experts - 1:
            preds[:, i] = official_pred_expert_help(params, top_choices, pooled[i], output / (i + 1), i).view((-1,))
    for i in range(num_experts - 1):
        help_target = (~correctness[:, i]) & correctness[:, i + 1 :].any(dim=1)
        loss += F.binary_cross_entropy_with_logits(preds[:, i], help_target.float(), pos_weight=preds.new_tensor([pos_weight]))
    return loss / (num_experts - 1)


def official_inference(params, top_choices, pooled, logits):
    """``ResNet_s.forward(x)`` at test time on precomputed expert outputs."""
    num_experts, batch = logits.shape[:2]
    expert_next = torch.ones(batch, dtype=torch.bool)
    num_experts_for_each_sample = torch.ones((batch, 1), dtype=torch.long)
    output = logits[0].clone()
    feat = pooled[0]
    for i in range(1, num_experts):
        pred = official_pred_expert_help(params, top_choices, feat, output[expert_next] / i, i - 1).view((-1,))
        expert_next[expert_next.clone()] = torch.sigmoid(pred) > 0.5
        if not expert_next.any():
            break
        output[expert_next] += logits[i][expert_next]
        feat = pooled[i][expert_next]
        num_experts_for_each_sample[expert_next] += 1
    return output / num_experts_for_each_sample, num_experts_for_each_sample.view(-1)


def router_params(router: ExpertRouter) -> dict:
    return {
        "hidden_w": [h.weight.detach() for h in router.hidden], "hidden_b": [h.bias.detach() for h in router.hidden],
        "out_w": router.out[0].weight.detach(), "out_b": router.out[0].bias.detach(),
    }  # fmt: skip


def expert_outputs(net, x):
    shared = net.shared(x)
    outs = [net.expert_output(shared, e) for e in range(net.num_experts)]
    return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])


def test_router_loss_matches_official():
    torch.manual_seed(0)
    net = MultiExpertCIFARResNet(10, num_experts=3, depth=8).eval()
    router = ExpertRouter(3, net.num_features, top_choices=4, pos_weight=20.0)
    x, target = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    with torch.no_grad():
        pooled, logits = expert_outputs(net, x)
    expected = official_training_loss(router_params(router), 4, 20.0, pooled, logits, target)
    got = router.loss(pooled, logits, target)
    torch.testing.assert_close(got.view(1), expected, atol=1e-6, rtol=1e-6)
    # gradients w.r.t. the router's weights
    params = {k: ([p.clone().requires_grad_(True) for p in v] if isinstance(v, list) else v.clone().requires_grad_(True))
              for k, v in router_params(router).items()}  # fmt: skip
    official_training_loss(params, 4, 20.0, pooled, logits, target).sum().backward()
    got.backward()
    torch.testing.assert_close(router.hidden[1].weight.grad, params["hidden_w"][1].grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(router.out[0].weight.grad, params["out_w"].grad, atol=1e-6, rtol=1e-6)


def test_routed_inference_matches_official():
    torch.manual_seed(1)
    net = MultiExpertCIFARResNet(10, num_experts=4, depth=8).eval()
    router = ExpertRouter(4, net.num_features, top_choices=3)
    x = torch.randn(32, 3, 8, 8)
    with torch.no_grad():
        pooled, logits = expert_outputs(net, x)
        # a bias that sends half of the samples on at the first decision (random weights send all or none)
        router.out[0].bias -= router.help_logits(pooled[0], logits[0], 0).median()
    expected, expected_used = official_inference(router_params(router), 3, pooled, logits)
    got, used = router.route(net, x)
    assert torch.equal(used, expected_used)
    assert 1 < used.float().mean() < 4  # some samples stop early, some go on
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-6)
