"""Activation offloading (train/activation_offload.py) and its place in the checkpointing plan."""

import pytest
import torch

from longvu.tiny import tiny_model


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def ids():
    return torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))


def test_offloaded_layers_send_each_activation_once_and_give_the_same_gradients(ids, monkeypatch):
    from train import activation_offload
    from train.activation_offload import ActivationOffloader

    monkeypatch.setattr(activation_offload, "MIN_BYTES", 0)  # the tiny model's activations are small
    reference = tiny_model("video").train()
    ref_loss, ref_grads = _loss_and_grads(reference, ids)

    model = tiny_model("video").train()
    offloader = ActivationOffloader(torch.device("cpu"))
    offloader.wrap(list(model.model.layers), [0])
    saved, packed = [], []
    real_hooks = offloader.hooks

    def spying_hooks(layer):  # what the layer saves, and what the offloader makes of it
        pack, unpack = real_hooks(layer)

        def spying_pack(t):
            saved.append(t)
            packed.append(pack(t))
            return packed[-1]
        return spying_pack, unpack

    monkeypatch.setattr(offloader, "hooks", spying_hooks)
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    offloaded = [p for p in packed if isinstance(p, activation_offload._Offloaded)]
    distinct = {id(p) for p in offloaded}
    # activations went to the "host", parameters did not; a tensor saved twice went once
    assert offloaded and len(offloader.pending[0]) == len(distinct) < len(offloaded)
    weights = {p.data_ptr() for p in model.parameters()}
    saved_weights = [p for t, p in zip(saved, packed) if t.data_ptr() in weights]
    assert saved_weights and not any(isinstance(p, activation_offload._Offloaded) for p in saved_weights)
    assert offloader.copied == sum(p.host.numel() * p.host.element_size() for p in offloader.pending[0])
    assert offloader.pool.allocated >= offloader.copied
    loss.backward()
    assert offloader.pending == {}  # reloaded: the next layer's backward started it
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert torch.equal(loss, ref_loss) and grads.keys() == ref_grads.keys()
    for name, grad in grads.items():  # (the embedding's gradient sums in a thread-dependent order)
        torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=1e-6)


def test_the_last_layer_offloaded_reloads_when_its_backward_asks(ids, monkeypatch):
    from train import activation_offload
    from train.activation_offload import ActivationOffloader

    monkeypatch.setattr(activation_offload, "MIN_BYTES", 0)
    reference = tiny_model("video").train()
    _, ref_grads = _loss_and_grads(reference, ids)
    model = tiny_model("video").train()
    offloader = ActivationOffloader(torch.device("cpu"))
    offloader.wrap(list(model.model.layers), [0, 1])  # no layer after the last one to start its reload
    _, grads = _loss_and_grads(model, ids)
    assert offloader.pending == {} and offloader.copied > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=1e-6)
    allocated = offloader.pool.allocated
    _loss_and_grads(model, ids)  # a second step reuses the first one's host buffers
    assert offloader.pool.allocated == allocated > 0
    with torch.no_grad():  # evaluation: nothing is offloaded
        copied = offloader.copied
        model(input_ids=ids)
        assert offloader.copied == copied


def test_the_plan_offloads_the_first_layers_and_recomputes_among_the_rest():
    from train.activation_checkpointing import Footprint, resolve_plan

    fp = Footprint(fixed=10, kept_layer=4, checkpointed_layer=1, layers=4)  # peak(n, o) = 26 - 3n - 4o
    assert fp.peak(0, 2) == 18 and fp.peak(1, 2) == 15
    plan = resolve_plan("auto", fp, capacity=15, offloaded=2)
    assert (plan.policy, plan.layers, plan.offloaded, plan.estimated_bytes) == ("selective", 1, 2, 15)
    assert resolve_plan("auto", fp, capacity=18, offloaded=2).policy == "none"
    assert resolve_plan("full", fp, capacity=None, offloaded=1).layers == 3
    assert "2 offloaded to host memory" in plan.describe()


def test_apply_plan_wires_offloaded_recomputed_and_kept_layers(ids, monkeypatch):
    from train import activation_offload
    from train.activation_checkpointing import CheckpointPlan, apply_plan

    monkeypatch.setattr(activation_offload, "MIN_BYTES", 0)
    reference = tiny_model("video", num_hidden_layers=3).train()
    _, ref_grads = _loss_and_grads(reference, ids)
    model = tiny_model("video", num_hidden_layers=3).train()
    apply_plan(model, CheckpointPlan("selective", 1, offloaded=1))
    layers = model.model.layers
    assert [layer.gradient_checkpointing for layer in layers] == [False, True, False]
    assert [layer.mlp.recompute_product for layer in layers] == [True, False, True]
    assert "forward" in vars(layers[0]) and "forward" not in vars(layers[1])  # only the first is offloaded
    _, grads = _loss_and_grads(model, ids)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=1e-6)


def test_offloaded_layers_are_a_gpu_setting(tmp_path, caplog):
    from train.activation_checkpointing import plan_for_run
    from train.config import ConfigError, load_run_config

    manifest = tmp_path / "m.jsonl"
    manifest.write_text("")
    with pytest.raises(ConfigError, match="training.offloaded_layers=-1"):
        load_run_config(None, [f"data.train_manifest={manifest}", "training.offloaded_layers=-1"])
    config = load_run_config(None, [f"data.train_manifest={manifest}", "training.offloaded_layers=1"])
    with caplog.at_level("WARNING", logger="train.activation_checkpointing"):
        plan = plan_for_run(tiny_model("video"), config, None, torch.device("cpu"), 1)
    assert plan.offloaded == 0 and "training.offloaded_layers=1 is unused: there is no GPU" in caplog.text


def test_host_buffers_round_up_to_a_sixteenth_of_their_power_of_two():
    from train.activation_offload import HostPool

    assert HostPool.size_class(1000) == 4096  # at least 4 KiB steps
    assert HostPool.size_class(2**30) == 2**30
    assert HostPool.size_class(2**30 + 1) == 2**30 + 2**26
    pool = HostPool(pin=False)
    buffer = pool.take(3 * 2**20 + 5)
    assert buffer.numel() == HostPool.size_class(3 * 2**20 + 5) < 3.2 * 2**20
    pool.give(buffer)
    assert pool.take(3 * 2**20 + 1000) is buffer and pool.allocated == buffer.numel()  # the same class
