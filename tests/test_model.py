"""The model blocks: KJT construction, towers and masks, ESMM, heads, losses, save/load."""

from __future__ import annotations

import json
import math

import pytest
import torch

from recsys.config import ModelConfig
from recsys.errors import ConfigError
from recsys.losses import TaskWeighting, item_log_q, retrieval_logits, retrieval_loss, task_losses
from recsys.mmoe import MultiTaskRanker
from recsys.history import mean_content
from recsys.model import ModelSpec, RecsysModel, active_tasks, catalogue_states, fit_history, ids_to_kjt, load_model, save_model
from training.data import history_content_sums

torch.set_num_threads(1)

TEXT_DIM, IMAGE_DIM, HISTORY_LEN = 8, 6, 5


def make_model(tasks=("click", "conversion", "rating"), seed: int = 0, **config) -> RecsysModel:
    torch.manual_seed(seed)
    spec = ModelSpec(
        n_users=11, n_items=21, history_len=HISTORY_LEN, text_dim=TEXT_DIM, image_dim=IMAGE_DIM, tasks=tuple(tasks),
        rating_range=(1.0, 5.0), user_features={"cat_age": 4, "num_activity": None}, item_features={"cat_genre": 3, "num_price": None},
        config=ModelConfig(dim=16, embedding_dim=8, expert_dim=16, tower_dim=8, **config),
    )
    model = RecsysModel(spec)
    model.set_feature_values(
        user_cat=torch.randint(0, 4, (11, 1)), user_num=torch.randn(11, 1),
        item_cat=torch.randint(0, 3, (21, 1)), item_num=torch.randn(21, 1),
    )
    return model.eval()


def make_batch(n: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(1, 21, (n, HISTORY_LEN), generator=g)
    history[:, 3:] = 0  # padding
    return {
        "user_idx": torch.randint(1, 11, (n,), generator=g),
        "item_idx": torch.arange(1, n + 1),
        "history": history,
        "text": torch.randn(n, TEXT_DIM, generator=g),
        "text_mask": torch.ones(n),
        "image": torch.randn(n, IMAGE_DIM, generator=g),
        "image_mask": torch.ones(n),
        "click": torch.tensor([1.0, 0, 1, 1, 0, 1])[:n],
        "conversion": torch.tensor([1.0, 0, 0, 1, 0, 0])[:n],
        "rating": torch.tensor([4.0, float("nan"), 2.0, 5.0, float("nan"), 3.0])[:n],
    }


# -- KJT construction -----------------------------------------------------------------------
def test_kjt_drops_padding_and_keeps_per_row_lengths_by_key():
    kjt = ids_to_kjt(["history_0", "history_1", "item_id"], torch.tensor([[3, 5, 4], [0, 0, 0], [7, 0, 6]]))
    by_key = kjt.to_dict()
    assert by_key["history_0"].lengths().tolist() == [1, 0, 1] and by_key["history_0"].values().tolist() == [3, 7]
    assert by_key["history_1"].lengths().tolist() == [1, 0, 0] and by_key["history_1"].values().tolist() == [5]
    assert by_key["item_id"].lengths().tolist() == [1, 0, 1] and by_key["item_id"].values().tolist() == [4, 6]


def test_user_tower_reads_the_mean_of_the_histories_non_padding_item_rows():
    model = make_model()
    item_table = model.embedding_tables.state_dict()["embedding_bags.item.weight"]
    state = model.user_state(torch.tensor([1]), torch.tensor([[2, 5, 0, 0]]))
    torch.testing.assert_close(state["history_keys"][0, :2], item_table[[2, 5]])  # each position is its item's row
    assert torch.count_nonzero(state["history_keys"][0, 2:]) == 0 and state["history_mask"].tolist() == [[True, True] + [False] * (HISTORY_LEN - 2)]
    with torch.no_grad():  # the user tower sees the mean: a history of the two rows' mean item says the same
        item_table_module = model.embedding_tables.embedding_bags["item"]
        item_table_module.weight[7] = item_table[[2, 5]].mean(0)
    torch.testing.assert_close(model.user_vectors(torch.tensor([1]), torch.tensor([[7, 0, 0, 0]])), state["user_vec"])


def test_padding_width_does_not_change_the_user_vector():
    model = make_model()
    short = model.user_vectors(torch.tensor([3]), torch.tensor([[4, 9]]))
    long = model.user_vectors(torch.tensor([3]), torch.tensor([[4, 9, 0, 0, 0, 0]]))
    torch.testing.assert_close(short, long)


def test_unknown_ids_fall_back_to_index_zero():
    model = make_model()
    history = torch.zeros(2, HISTORY_LEN, dtype=torch.int64)
    users = model.user_vectors(torch.tensor([0, 999]), history)
    torch.testing.assert_close(users[0], users[1])
    items = model.item_vectors(torch.tensor([0, 12345]))
    torch.testing.assert_close(items[0], items[1])


def test_tower_vectors_are_unit_length():
    model, batch = make_model(item_bias=False, popularity_prior="off"), make_batch()
    out = model(batch)
    torch.testing.assert_close(out["user_vec"].norm(dim=-1), torch.ones(6))
    torch.testing.assert_close(out["item_vec"].norm(dim=-1), torch.ones(6))


def test_item_bias_is_the_last_coordinate_and_adds_to_the_cosine():
    model, batch = make_model(item_bias=True), make_batch()
    with torch.no_grad():  # a bias that differs between items and reads their content
        model.item_tower.bias.weight.normal_()
        model.item_tower.bias.bias.fill_(0.25)
    out = model(batch)
    d = model.spec.config.dim
    user, item = out["user_vec"], out["item_vec"]
    assert user.shape == item.shape == (6, d + 1)
    torch.testing.assert_close(user[:, :d].norm(dim=-1), torch.ones(6))
    torch.testing.assert_close(item[:, :d].norm(dim=-1), torch.ones(6))
    torch.testing.assert_close(user[:, d], torch.ones(6))
    assert item[:, d].std() > 0.1  # one bias per item, not a constant
    # the towers' score is the cosine plus the item's bias; the ranker's retrieval_score is the cosine alone
    cosine = (user[:, :d] * item[:, :d]).sum(-1)
    torch.testing.assert_close((user * item).sum(-1), cosine + item[:, d])
    torch.testing.assert_close(out["retrieval_score"], cosine)


def test_a_model_saved_before_the_item_bias_loads_without_one(tmp_path):
    model = make_model(item_bias=False)
    save_model(model, tmp_path)
    meta = json.loads((tmp_path / "model.json").read_text())
    del meta["config"]["item_bias"]  # as written before the setting existed
    (tmp_path / "model.json").write_text(json.dumps(meta))
    loaded = load_model(tmp_path)
    assert loaded.spec.config.item_bias is False and loaded.item_tower.bias is None


def test_a_model_saved_before_the_attention_setting_loads_with_the_mlp_attention(tmp_path):
    model = make_model(attention="mlp")
    save_model(model, tmp_path)
    meta = json.loads((tmp_path / "model.json").read_text())
    del meta["config"]["attention"]  # as written before the setting existed
    (tmp_path / "model.json").write_text(json.dumps(meta))
    batch = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path)(batch)["p_click"], model(batch)["p_click"])  # strict load: the same parameters


# -- modalities -----------------------------------------------------------------------------
@pytest.mark.parametrize("fusion", ["concat", "gated"])
def test_masked_content_does_not_change_the_item_vector(fusion):
    model, batch = make_model(fusion=fusion), make_batch()
    masked = torch.zeros(6)
    a = model.item_vectors(batch["item_idx"], batch["text"], masked, batch["image"], masked)
    b = model.item_vectors(batch["item_idx"], batch["text"] * 100 + 3, masked, -batch["image"], masked)
    torch.testing.assert_close(a, b)


def test_missing_modality_uses_the_learned_standin():
    model, batch = make_model(), make_batch()
    with torch.no_grad():
        model.item_tower.text_standin.fill_(0.5)
    masked = torch.zeros(6)
    before = model.item_vectors(batch["item_idx"], batch["text"], masked, batch["image"], batch["image_mask"])
    with torch.no_grad():
        model.item_tower.text_standin.fill_(-0.5)
    after = model.item_vectors(batch["item_idx"], batch["text"], masked, batch["image"], batch["image_mask"])
    assert not torch.allclose(before, after)
    omitted = model.item_vectors(batch["item_idx"], None, None, batch["image"], batch["image_mask"])
    torch.testing.assert_close(omitted, after)  # no content at all == content masked


def test_present_content_changes_the_item_vector():
    model, batch = make_model(), make_batch()
    a = model.item_vectors(batch["item_idx"], batch["text"], batch["text_mask"], batch["image"], batch["image_mask"])
    b = model.item_vectors(batch["item_idx"], -batch["text"], batch["text_mask"], batch["image"], batch["image_mask"])
    assert not torch.allclose(a, b)


def test_modality_dropout_only_acts_in_training():
    model, batch = make_model(modality_dropout=0.5), make_batch()
    eval_a, eval_b = model(batch)["item_vec"], model(batch)["item_vec"]
    torch.testing.assert_close(eval_a, eval_b)
    model.train()
    torch.manual_seed(0)
    assert not torch.allclose(model(batch)["item_vec"], eval_a)


def test_switched_off_modality_builds_no_projection():
    model = make_model(use_image=False)
    assert model.item_tower.image_proj is None and model.item_tower.text_proj is not None


def test_gated_fusion_gates_are_a_distribution_over_modalities():
    out = make_model(fusion="gated")(make_batch())
    assert out["modality_gates"].shape == (6, 3)
    torch.testing.assert_close(out["modality_gates"].sum(-1), torch.ones(6))


# -- heads ----------------------------------------------------------------------------------
def test_esmm_ctcvr_is_click_times_cvr_and_a_probability():
    out = make_model()(make_batch())
    torch.testing.assert_close(out["p_ctcvr"], out["p_click"] * out["p_cvr"])
    assert bool(((out["p_ctcvr"] >= 0) & (out["p_ctcvr"] <= 1)).all())
    assert bool((out["p_ctcvr"] <= out["p_click"]).all())


def test_rating_output_stays_within_the_rating_range():
    model, batch = make_model(), make_batch()
    with torch.no_grad():
        model.ranker.towers["rating"][-1].bias.fill_(30.0)
        rating = model(batch)["rating"]
    assert float(rating.min()) >= 1.0 and float(rating.max()) <= 5.0
    assert float(rating.max()) > 4.9  # saturates towards the top, not clipped below it


def test_switched_off_head_yields_no_output_and_no_loss():
    model, batch = make_model(tasks=("click", "rating")), make_batch()
    out = model(batch)
    assert "p_cvr" not in out and "p_ctcvr" not in out and "logit_conversion" not in out
    assert set(task_losses(out, batch)) == {"click", "rating"}
    assert "conversion" not in model.ranker.towers


def test_heads_follow_the_data_and_the_config():
    assert active_tasks({"click": True, "conversion": False, "rating": True}, ("click", "conversion", "rating")) == ("click", "rating")
    assert active_tasks({"click": True, "conversion": True, "rating": True}, ("click", "conversion")) == ("click", "conversion")
    with pytest.raises(ConfigError, match="click head is required"):
        active_tasks({"click": True}, ("rating",))


def test_rating_loss_uses_rated_rows_only():
    model, batch = make_model(), make_batch()
    out = model(batch)
    rated = ~torch.isnan(batch["rating"])
    expected = ((out["rating"][rated] - batch["rating"][rated]) ** 2).mean()
    torch.testing.assert_close(task_losses(out, batch)["rating"], expected)


def test_ctcvr_loss_is_bce_of_the_product_over_all_impressions():
    model, batch = make_model(), make_batch()
    out = model(batch)
    expected = torch.nn.functional.binary_cross_entropy(out["p_ctcvr"], batch["click"] * batch["conversion"])
    torch.testing.assert_close(task_losses(out, batch)["ctcvr"], expected, rtol=1e-4, atol=1e-5)


def test_direct_cvr_term_adds_bce_of_p_cvr_on_clicked_rows_only():
    model, batch = make_model(), make_batch()
    out = model(batch)
    clicked = batch["click"] > 0
    direct = torch.nn.functional.binary_cross_entropy(out["p_cvr"][clicked], batch["conversion"][clicked])
    esmm = task_losses(out, batch)["ctcvr"]
    torch.testing.assert_close(task_losses(out, batch, cvr_on_clicks=0.5)["ctcvr"], esmm + 0.5 * direct, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind, experts", [("mmoe", 4), ("shared_bottom", 1), ("single_task", 3)])
def test_ranker_variants_route_through_their_experts(kind, experts):
    ranker = MultiTaskRanker(12, ["click", "conversion", "rating"], kind, experts=4, expert_dim=8, tower_dim=4)
    logits, gates = ranker(torch.randn(5, 12))
    assert len(ranker.experts) == experts and gates.shape == (5, 3, experts)
    torch.testing.assert_close(gates.sum(-1), torch.ones(5, 3))
    if kind == "single_task":
        torch.testing.assert_close(gates[0], torch.eye(3))
    assert set(logits) == {"click", "conversion", "rating"}


@pytest.mark.parametrize("kind", ["mmoe", "shared_bottom", "single_task"])
def test_ranker_runs_its_experts_in_one_product_equal_to_each_expert_on_its_own(kind):
    torch.manual_seed(0)
    ranker = MultiTaskRanker(12, ["click", "conversion", "rating"], kind, experts=4, expert_dim=8, tower_dim=4)
    x = torch.randn(6, 12, requires_grad=True)
    logits, gates = ranker(x)
    # the textbook form: each expert and each gate on its own, the mixture as an einsum
    experts = torch.stack([expert(x) for expert in ranker.experts], dim=1)
    expected_gates = torch.stack([torch.softmax(ranker.gates[t](x), -1) for t in ranker.tasks], dim=1) if ranker.gates is not None else gates
    mixed = torch.einsum("bte,bed->btd", expected_gates, experts)
    torch.testing.assert_close(gates, expected_gates)
    for i, task in enumerate(ranker.tasks):
        torch.testing.assert_close(logits[task], ranker.towers[task](mixed[:, i]).squeeze(-1))
    # and the gradients reach every expert's and every gate's own parameters
    sum(v.sum() for v in logits.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ranker.experts.parameters())


# -- retrieval ------------------------------------------------------------------------------
def test_retrieval_loss_is_lower_for_aligned_than_for_random_vectors():
    torch.manual_seed(0)
    users = torch.nn.functional.normalize(torch.randn(32, 16), dim=-1)
    random_items = torch.nn.functional.normalize(torch.randn(32, 16), dim=-1)
    batch = {"click": torch.ones(32), "item_idx": torch.arange(1, 33), "user_idx": torch.arange(1, 33)}
    log_q = torch.zeros(40)
    aligned = retrieval_loss({"user_vec": users, "item_vec": users}, batch, log_q, 0.1)
    random = retrieval_loss({"user_vec": users, "item_vec": random_items}, batch, log_q, 0.1)
    assert float(aligned) < 0.1 < math.log(32) * 0.5 < float(random)


def test_log_q_correction_shifts_each_column_by_minus_log_q():
    torch.manual_seed(0)
    u, v = torch.randn(4, 8), torch.randn(4, 8)
    items = torch.tensor([3, 1, 2, 5])
    log_q = torch.log(torch.tensor([0.1, 0.2, 0.05, 0.4, 0.1, 0.15]))
    plain = retrieval_logits(u, v, items, torch.zeros(6), 0.5)
    corrected = retrieval_logits(u, v, items, log_q, 0.5)
    torch.testing.assert_close(corrected - plain, (-log_q[items]).expand(4, 4))


def test_duplicate_items_in_a_batch_are_not_negatives():
    u = v = torch.eye(3)
    logits = retrieval_logits(u, v, torch.tensor([7, 7, 2]), torch.zeros(8), 1.0)
    assert logits[0, 1] == float("-inf") and logits[1, 0] == float("-inf")
    assert torch.isfinite(logits.diagonal()).all() and torch.isfinite(logits[0, 2])


def test_retrieval_loss_only_reads_clicked_rows():
    users = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    batch = {"click": torch.tensor([1.0, 1, 0, 0]), "item_idx": torch.arange(4), "user_idx": torch.arange(4)}
    scrambled = users.clone()
    scrambled[2:] = torch.randn(2, 8)
    a = retrieval_loss({"user_vec": users, "item_vec": users}, batch, torch.zeros(4), 0.1)
    b = retrieval_loss({"user_vec": scrambled, "item_vec": users}, batch, torch.zeros(4), 0.1)
    torch.testing.assert_close(a, b)


def test_all_rows_retrieval_scores_clicked_users_against_every_rows_item():
    torch.manual_seed(0)
    vecs = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    batch = {"click": torch.tensor([1.0, 0, 1, 0, 0]), "item_idx": torch.tensor([4, 1, 2, 3, 4]), "user_idx": torch.arange(5)}
    loss = retrieval_loss({"user_vec": vecs, "item_vec": vecs}, batch, torch.zeros(6), 0.5, all_rows=True)
    # by hand: users 0 and 2 against the five rows' items; row 4 repeats user 0's item 4, so it is masked for user 0
    logits = vecs[[0, 2]] @ vecs.T / 0.5
    logits[0, 4] = float("-inf")
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])))
    clicked_only = retrieval_loss({"user_vec": vecs, "item_vec": vecs}, batch, torch.zeros(6), 0.5)
    assert float(clicked_only) < float(loss)  # more negatives, a harder softmax


def test_all_rows_equals_clicked_when_every_row_is_clicked():
    torch.manual_seed(1)
    users, items = torch.randn(6, 8), torch.randn(6, 8)
    batch = {"click": torch.ones(6), "item_idx": torch.tensor([1, 2, 2, 3, 4, 5]), "user_idx": torch.arange(6)}
    log_q = torch.log(torch.tensor([0.1, 0.2, 0.05, 0.4, 0.1, 0.15]))
    a = retrieval_loss({"user_vec": users, "item_vec": items}, batch, log_q, 0.2)
    b = retrieval_loss({"user_vec": users, "item_vec": items}, batch, log_q, 0.2, all_rows=True)
    torch.testing.assert_close(a, b)


def test_a_users_other_clicked_rows_are_not_its_negatives():
    torch.manual_seed(2)
    vecs = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    batch = {"click": torch.tensor([1.0, 1, 1, 0]), "item_idx": torch.tensor([1, 2, 3, 4]), "user_idx": torch.tensor([7, 7, 8, 7])}
    loss = retrieval_loss({"user_vec": vecs, "item_vec": vecs}, batch, torch.zeros(6), 0.5, all_rows=True)
    logits = vecs[:3] @ vecs.T / 0.5
    logits[0, 1] = logits[1, 0] = float("-inf")  # user 7's two clicks mask each other; its unclicked row 3 stays a negative
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])))


def test_uniform_negatives_join_the_candidates_with_their_log_q():
    torch.manual_seed(3)
    users, items, extra = torch.randn(3, 8), torch.randn(3, 8), torch.randn(2, 8)
    batch = {"click": torch.ones(3), "item_idx": torch.tensor([1, 2, 3]), "user_idx": torch.arange(3)}
    log_q = torch.log(torch.tensor([1.0, 0.5, 0.2, 0.1, 0.3, 0.4]))
    loss = retrieval_loss({"user_vec": users, "item_vec": items}, batch, log_q, 0.5, uniform=(extra, torch.tensor([4, 1])))
    logits = users @ torch.cat([items, extra]).T / 0.5 - log_q[torch.tensor([1, 2, 3, 4, 1])]
    logits[0, 4] = float("-inf")  # the uniform draw of item 1 is user 0's own item: not a negative
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, torch.arange(3)))


def test_full_softmax_ranks_the_positive_against_the_whole_catalogue_but_padding_and_exclusions():
    from recsys.losses import full_softmax_loss

    torch.manual_seed(4)
    users, catalogue = torch.randn(2, 8), torch.randn(5, 8)  # row 0 = padding
    loss = full_softmax_loss(users, torch.tensor([2, 4]), catalogue, 0.5, exclude=(torch.tensor([0, 0, 1]), torch.tensor([3, 2, 4])))
    logits = users @ catalogue.T / 0.5
    logits[:, 0] = float("-inf")
    logits[0, 3] = float("-inf")  # user 0's other positive; user 1's exclusion of its own positive 4 is ignored
    logits[1, 4] = users[1] @ catalogue[4] / 0.5
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, torch.tensor([2, 4])))


def test_full_softmax_future_term_is_the_multinomial_of_the_later_positives_and_the_own_item():
    from recsys.losses import full_softmax_loss

    torch.manual_seed(5)
    users, catalogue = torch.randn(2, 8), torch.randn(6, 8)  # row 0 = padding
    positive = torch.tensor([2, 4])
    exclude = (torch.tensor([0, 0, 0, 1]), torch.tensor([3, 5, 1, 2]))  # row 0's other positives 3, 5, 1; row 1's 2
    future = torch.tensor([[3, 5, 0], [0, 0, 0]])  # row 0 goes on to click 3 and 5; row 1 clicks nothing later
    loss = full_softmax_loss(users, positive, catalogue, 0.5, exclude, future, future_weight=0.7)
    next_item = full_softmax_loss(users, positive, catalogue, 0.5, exclude)
    logits = (users @ catalogue.T / 0.5).tolist()

    def log_softmax(row, allowed, at):
        return logits[row][at] - math.log(sum(math.exp(logits[row][j]) for j in allowed))

    row0 = [log_softmax(0, [2, 3, 4, 5], j) for j in (2, 3, 5)]  # 1 stays masked (an earlier positive), 3 and 5 are targets
    row1 = [log_softmax(1, [1, 3, 4, 5], 4)]
    expected = next_item.item() + 0.7 * (-(sum(row0) / 3) - row1[0]) / 2
    assert abs(loss.item() - expected) < 1e-4
    assert full_softmax_loss(users, positive, catalogue, 0.5, exclude, future, future_weight=0.0).item() == next_item.item()


def test_later_positives_are_the_users_next_train_clicks_strictly_after_the_row():
    from recsys.config import load_config
    from training.epochs import RetrievalObjective

    train = {  # user 1 clicks 5 @10, 6 @20, 7 @20, (8 @25 shown, not clicked), 11 @30; user 2 clicks 9 @5, 10 @6
        "user_idx": torch.tensor([1, 1, 2, 1, 1, 2, 1]), "item_idx": torch.tensor([5, 6, 9, 7, 8, 10, 11]),
        "click": torch.tensor([1.0, 1, 1, 1, 0, 1, 1]), "timestamp": torch.tensor([10, 20, 5, 20, 25, 6, 30]),
    }  # fmt: skip
    cfg = load_config(None, ["train.future_positives=2"])
    objective = RetrievalObjective(cfg, train, 12, {})
    later = objective.later_positives(torch.tensor([1, 1, 1, 2, 2, 1]), torch.tensor([10, 20, 30, 5, 6, 0]))
    # a tie (6 and 7 at 20) is not "later"; the window keeps the next 2; other users' clicks never count
    assert later.tolist() == [[6, 7], [11, 0], [0, 0], [10, 0], [0, 0], [5, 6]]
    assert "multinomial" in objective.describe()
    sampled = RetrievalObjective(load_config(None, ["train.future_positives=2", "train.retrieval_softmax=sampled"]), train, 12, {})
    assert sampled.future == 0  # it extends the full softmax only
    no_times = RetrievalObjective(cfg, {k: v for k, v in train.items() if k != "timestamp"}, 12, {})
    assert no_times.future == 0


def test_set_softmax_is_the_multinomial_of_the_held_out_items_with_the_others_masked():
    from recsys.losses import set_softmax_loss

    torch.manual_seed(6)
    users, catalogue = torch.randn(2, 8), torch.randn(6, 8)  # row 0 = padding
    targets = (torch.tensor([0, 0, 1]), torch.tensor([2, 5, 3]))
    masked = (torch.tensor([0, 0, 1, 1]), torch.tensor([1, 4, 3, 2]))  # row 1 masks its own label 3: the label wins
    loss = set_softmax_loss(users, catalogue, 0.5, targets, masked)
    logits = (users @ catalogue.T / 0.5).tolist()

    def log_softmax(row, allowed, at):
        return logits[row][at] - math.log(sum(math.exp(logits[row][j]) for j in allowed))

    row0 = [log_softmax(0, [2, 3, 5], j) for j in (2, 5)]
    row1 = log_softmax(1, [1, 3, 4, 5], 3)
    assert abs(loss.item() - (-(sum(row0) / 2) - row1) / 2) < 1e-4


def test_set_examples_hold_out_part_of_each_users_train_clicks_and_build_the_state_from_the_rest():
    from recsys.config import load_config
    from training.epochs import RetrievalObjective

    clicked = {1: [3, 4, 5, 6, 7, 8, 9, 10, 11, 12], 2: [13], 3: [14, 15, 16]}  # user 2 has one click: no example
    users = [u for u, items in clicked.items() for _ in items]
    train = {"user_idx": torch.tensor(users + [1]), "item_idx": torch.tensor(sum(clicked.values(), []) + [2]), "click": torch.tensor([1.0] * len(users) + [0.0])}
    cfg = load_config(None, ["train.set_weight=1", "train.set_holdout=0.3", "data.history_len=4"])
    objective = RetrievalObjective(cfg, train, 17, {})
    assert "set term" in objective.describe()
    torch.manual_seed(0)
    kept, history, targets, masked = objective.set_examples(torch.tensor([1, 2, 3]))
    assert kept.tolist() == [1, 3]
    for row, user in enumerate((1, 3)):
        labels = targets[1][targets[0] == row].tolist()
        hidden = masked[1][masked[0] == row].tolist()
        inputs = [i for i in history[row].tolist() if i]
        assert len(labels) == {1: 3, 3: 1}[user]  # round(0.3 n), at least one
        assert sorted(labels + hidden) == clicked[user]  # every train click is a label or masked, none both
        assert len(inputs) == min(4, len(clicked[user]) - len(labels)) and set(inputs) <= set(hidden)  # the state's history: non-labels only
        assert 2 not in labels + hidden + inputs  # a shown, not clicked row is no positive
    torch.manual_seed(1)
    again = objective.set_examples(torch.tensor([1, 2, 3]))
    assert again[2][1].tolist() != targets[1].tolist()  # a fresh random split each step
    sampled = RetrievalObjective(load_config(None, ["train.set_weight=1", "train.retrieval_softmax=sampled"]), train, 17, {})
    assert sampled.set_weight == 0  # it extends the full softmax only


def test_set_weight_auto_is_on_for_data_without_impressions_only():
    from recsys.config import load_config
    from training.epochs import AUTO_SET_WEIGHT, RetrievalObjective, set_term_weight

    auto, explicit, off = load_config(None, []), load_config(None, ["train.set_weight=0.5"]), load_config(None, ["train.set_weight=0"])
    assert auto.train.set_weight == "auto" and AUTO_SET_WEIGHT > 0
    assert set_term_weight(auto, {"impressions": False}) == AUTO_SET_WEIGHT
    assert set_term_weight(auto, {"impressions": True}) == 0.0 and set_term_weight(auto, None) == 0.0
    assert set_term_weight(explicit, {"impressions": True}) == 0.5 and set_term_weight(off, {"impressions": False}) == 0.0
    train = {"user_idx": torch.tensor([1, 1, 2]), "item_idx": torch.tensor([3, 4, 5]), "click": torch.tensor([1.0, 1, 1])}
    assert RetrievalObjective(auto, train, 6, {}, {"impressions": False}).set_weight == AUTO_SET_WEIGHT
    assert RetrievalObjective(auto, train, 6, {}, {"impressions": True}).set_weight == 0.0


def test_mixed_log_q_is_the_expected_count_of_in_batch_plus_uniform_candidates():
    from recsys.losses import mixed_log_q

    counts = torch.tensor([0, 6, 3, 1])  # item 0 is padding
    expected = torch.tensor([1 / 11, 6 / 11, 3 / 11, 1 / 11]) * 100 + 30 / 3
    torch.testing.assert_close(mixed_log_q(counts, 100.0, 30).exp(), expected.float())


def test_item_log_q_counts_positives_or_all_rows():
    items, clicked = torch.tensor([1, 1, 1, 2]), torch.tensor([1, 0, 0, 1])
    torch.testing.assert_close(item_log_q(items, clicked, 3).exp(), torch.tensor([1 / 3, 1 / 3, 1 / 3], dtype=torch.float32))
    torch.testing.assert_close(item_log_q(items, None, 3).exp(), torch.tensor([1 / 5, 3 / 5, 1 / 5], dtype=torch.float32))


# -- task weighting -------------------------------------------------------------------------
def test_uncertainty_weighting_is_exp_minus_s_times_loss_plus_s():
    weighting = TaskWeighting(["click", "rating"], "uncertainty")
    with torch.no_grad():
        weighting.log_var.copy_(torch.tensor([0.5, -1.0]))
    total = weighting({"click": torch.tensor(2.0), "rating": torch.tensor(3.0)})
    torch.testing.assert_close(total, torch.tensor(math.exp(-0.5) * 2 + 0.5 + math.exp(1.0) * 3 - 1.0))


def test_uncertainty_weighting_settles_at_one_over_each_tasks_loss():
    # For a fixed loss L, exp(-s) L + s is smallest where its derivative 1 - exp(-s) L is 0: s* = log L,
    # so the learned weight exp(-s*) is 1 / L. Adam on the log-variances alone, losses held fixed.
    losses = {"click": torch.tensor(0.5), "ctcvr": torch.tensor(2.0), "rating": torch.tensor(8.0)}
    weighting = TaskWeighting(list(losses), "uncertainty")
    optimizer = torch.optim.Adam(weighting.parameters(), lr=0.05)
    for _ in range(1000):
        optimizer.zero_grad()
        weighting(losses).backward()
        optimizer.step()
    weights = weighting.weights()
    for name, loss in losses.items():
        assert weights[name] == pytest.approx(1 / float(loss), rel=1e-3), (name, weights)


def test_gradnorm_lowers_the_weight_of_the_task_whose_gradient_norm_runs_ahead():
    # On one shared layer the click loss has 10x the gradient of the rating loss; both losses stay where
    # they started (equal training rates), so GradNorm's target is the mean weighted norm and it moves
    # weight from click to rating, towards w_click * 10 = w_rating. The update is the training loop's:
    # the gradient of gradnorm_loss w.r.t. the weights only, an Adam step, renormalise (sum = 2 tasks).
    shared = torch.nn.Parameter(torch.tensor([1.0, -0.5, 0.25]))
    weighting = TaskWeighting(["click", "rating"], "gradnorm")
    optimizer = torch.optim.Adam([weighting.gradnorm_w], lr=0.05)
    ratios = []
    for _ in range(10):
        losses = {"click": 10 * shared.pow(2).sum(), "rating": shared.pow(2).sum()}
        optimizer.zero_grad()
        weighting.gradnorm_w.grad = torch.autograd.grad(weighting.gradnorm_loss(losses, shared), weighting.gradnorm_w)[0]
        optimizer.step()
        weighting.renormalise()
        ratios.append(weighting.weights()["click"] / weighting.weights()["rating"])
    weights = weighting.weights()
    assert weights["click"] < 1.0 < weights["rating"], weights
    assert sum(weights.values()) == pytest.approx(2.0)
    assert all(later < earlier for earlier, later in zip(ratios, ratios[1:])), ratios  # every step lowers click relative to rating
    assert ratios[-1] > 0.1 - 1e-6, ratios  # and not past the balance point w_click / w_rating = 1 / 10


def test_static_weighting_uses_the_configured_lambdas():
    weighting = TaskWeighting(["click", "ctcvr"], "static", {"click": 1.0, "ctcvr": 0.25})
    torch.testing.assert_close(weighting({"click": torch.tensor(2.0), "ctcvr": torch.tensor(4.0)}), torch.tensor(3.0))


# -- save / load ----------------------------------------------------------------------------
def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    model, batch = make_model(fusion="gated", ranker="mmoe"), make_batch()
    save_model(model, tmp_path / "model", {"best_epoch": 3})
    loaded = load_model(tmp_path / "model")
    a, b = model(batch), loaded(batch)
    for key in ("user_vec", "item_vec", "p_click", "p_cvr", "p_ctcvr", "rating"):
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(model.item_cat, loaded.item_cat)  # feature buffers travel with the weights
    assert loaded.spec == model.spec and not loaded.training


def test_load_model_without_weights_names_the_step_to_run(tmp_path):
    from recsys.errors import RunError

    with pytest.raises(RunError, match="recsys train"):
        load_model(tmp_path / "model")


def test_one_user_row_is_ranked_against_many_candidates():
    model = make_model()
    items = torch.tensor([1, 4, 7, 9, 12])
    with torch.no_grad():
        user = model.user_state(torch.tensor([3]), torch.tensor([[2, 5, 0, 0]]))
        many = model.user_state(torch.tensor([3] * 5), torch.tensor([[2, 5, 0, 0]] * 5))
        item = model.item_state(items)
        broadcast = model.rank(user, item)["p_click"]
        torch.testing.assert_close(broadcast, model.rank(many, item)["p_click"])
        # the same scores as the training/evaluation pass over (user, item) rows
        rows = model({"user_idx": torch.tensor([3] * 5), "item_idx": items, "history": torch.tensor([[2, 5, 0, 0]] * 5)})
    torch.testing.assert_close(broadcast, rows["p_click"])


def test_kept_item_and_content_vectors_give_the_scores_of_the_towers():
    """The service keeps item_vec and content_vec per item: ranking from them equals ranking from the content."""
    model, batch = make_model(), make_batch()
    content = {k: batch[k] for k in ("text", "text_mask", "image", "image_mask")}
    with torch.no_grad():
        user = model.user_state(batch["user_idx"], batch["history"])
        full = model.item_state(batch["item_idx"], **content)
        kept = model.item_state(batch["item_idx"], item_vec=full["item_vec"], content_vec=full["content_vec"])
        torch.testing.assert_close(model.rank(user, kept)["p_ctcvr"], model.rank(user, full)["p_ctcvr"])
        torch.testing.assert_close(model.rank(user, full)["p_click"], model(batch)["p_click"])


@pytest.mark.parametrize("kind", ["mlp", "dot"])
def test_target_attention_gives_padding_no_weight_and_follows_the_candidate(kind):
    from recsys.attention import make_attention

    torch.manual_seed(0)
    attention = make_attention(kind, 4)
    keys = torch.randn(1, 3, 4)
    mask = torch.tensor([[True, True, False]])
    pooled, weights = attention(torch.randn(2, 4), keys, mask)
    assert weights.shape == (2, 3) and torch.all(weights[:, 2] == 0)
    torch.testing.assert_close(weights.sum(1), torch.ones(2))
    torch.testing.assert_close(pooled, weights[:, :2] @ keys[0, :2])
    assert not torch.allclose(weights[0], weights[1])  # two candidates weigh the same history differently
    changed = keys.clone()
    changed[0, 2] = 100.0  # what stands at a padding position never matters
    torch.testing.assert_close(attention(torch.randn(2, 4), changed, mask)[0].shape, pooled.shape)
    none, w = attention(torch.randn(2, 4), keys, torch.zeros(1, 3, dtype=torch.bool))
    assert torch.count_nonzero(none) == 0 and torch.count_nonzero(w) == 0  # an empty history pools to zero


@pytest.mark.parametrize("kind", ["mlp", "dot"])
def test_target_attention_over_grouped_candidates_equals_a_history_copied_per_candidate(kind):
    from recsys.attention import make_attention

    torch.manual_seed(1)
    attention = make_attention(kind, 4)
    keys, mask = torch.randn(3, 5, 4), torch.rand(3, 5) > 0.3
    query = torch.randn(6, 4)  # 3 users x 2 candidates, user 0's first
    grouped, grouped_weights = attention(query, keys, mask)
    copied, copied_weights = attention(query, keys.repeat_interleave(2, 0), mask.repeat_interleave(2, 0))
    torch.testing.assert_close(grouped, copied)
    torch.testing.assert_close(grouped_weights, copied_weights)
    with pytest.raises(ValueError, match="grouped"):
        attention(torch.randn(7, 4), keys, mask)


def test_dot_attention_backward_equals_autograd_of_its_formula():
    """The hand-written backward (training's path) against gradcheck and against autograd of the plain formula."""
    from recsys.attention import DotAttention, _DotAttentionFunction

    torch.manual_seed(2)
    query = torch.randn(4, 5, dtype=torch.double, requires_grad=True)
    keys = torch.randn(4, 3, 5, dtype=torch.double, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)  # an empty history and a padded one
    assert torch.autograd.gradcheck(lambda q, k: _DotAttentionFunction.apply(q, k, mask)[0], (query, keys))
    pooled, _ = DotAttention()(query, keys, mask)
    upstream = torch.randn(4, 5, dtype=torch.double)
    got = torch.autograd.grad(pooled, (query, keys), upstream)
    logits = (keys * query.unsqueeze(1)).sum(-1) / 5**0.5
    weights = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    want = torch.autograd.grad((weights.unsqueeze(-1) * keys).sum(1), (query, keys), upstream)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert torch.count_nonzero(got[1][1]) == 0 and torch.count_nonzero(got[1][0, 2]) == 0  # nothing reaches padding


@pytest.mark.parametrize("attention", ["mlp", "dot"])
def test_bf16_autocast_trains_and_stays_near_fp32(attention):
    """Under CPU bf16 autocast (benchmarks/train_throughput.py --bf16) the forward mixes bf16 projections with fp32 table
    rows and gate softmaxes: forward and backward run, and the heads stay within bf16 rounding of fp32."""
    model, batch = make_model(attention=attention, cross_dim=4), make_batch()
    model.train()
    torch.manual_seed(0)  # the same id-dropout masks in both calls: what differs is the precision alone
    fp32 = model(batch)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(batch)
    loss = sum(task_losses({k: v.float() for k, v in low.items()}, batch).values())
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.ranker.parameters())
    for key in ("p_click", "p_cvr", "rating"):
        torch.testing.assert_close(low[key].float(), fp32[key], atol=0.05, rtol=0.05)


def test_kept_first_layer_rows_of_another_width_are_refused_not_scored():
    """Rows kept for a model without the cross columns (4 columns narrower) must not be sliced as if they had them."""
    model = make_model(cross_dim=4)
    with torch.inference_mode():
        users, items = three_users_and_candidates(model, make_batch(n=12))
        rows = model.item_first_layer(items)
        with pytest.raises(ValueError, match="columns"):
            model.rank(users, {"item_vec": items["item_vec"], "first_layer": rows[:, :-4]})


def three_users_and_candidates(model: RecsysModel, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``user_state`` of the batch's first 3 rows and ``item_state`` of all its candidates (call under no_grad or inference_mode)."""
    users = model.user_state(batch["user_idx"][:3], batch["history"][:3])
    items = model.item_state(batch["item_idx"], text=batch.get("text"), text_mask=batch.get("text_mask"), image=batch.get("image"), image_mask=batch.get("image_mask"))
    return users, items


@pytest.mark.parametrize("attention", ["mlp", "dot"])
def test_rank_of_users_against_their_candidates_equals_the_rows_one_by_one(attention):
    model = make_model(attention=attention)
    batch = make_batch(n=6)
    with torch.no_grad():
        users, items = three_users_and_candidates(model, batch)
        grouped = model.rank(users, items)  # users 0, 1, 2 against items (0, 1), (2, 3), (4, 5)
        for u in range(3):
            one = model.rank({k: v[u : u + 1] for k, v in users.items()}, {k: v[2 * u : 2 * u + 2] for k, v in items.items()})
            for head, scores in one.items():
                torch.testing.assert_close(grouped[head][2 * u : 2 * u + 2], scores)
        with pytest.raises(ValueError, match="user rows against"):
            model.rank({k: v[:4] for k, v in model.user_state(batch["user_idx"], batch["history"]).items()}, items)  # 4 users, 6 candidates


@pytest.mark.parametrize(("item_bias", "cross_dim"), [(False, 0), (True, 0), (False, 6)])
def test_grouped_rank_through_the_factored_first_layer_equals_the_plain_per_pair_path(item_bias, cross_dim):
    """Under inference the user's columns go through the ranker's first layer once per user
    (``_grouped_first_layer``, LayerNorm split into shared and paired sums): the same heads as the
    plain path, which ``rank`` takes when every candidate has its own user row; with
    ``model.cross_dim`` the candidate's cross projection rides in the kept ``item_first_layer`` row."""
    model = make_model(item_bias=item_bias, cross_dim=cross_dim)
    assert model.item_first_width == model.ranker.first_layer()[0].shape[0] + 2 + cross_dim
    if item_bias:  # biases that differ between items, so the ranker's u . v column carries them
        with torch.no_grad():
            model.item_tower.bias.weight.normal_()
    batch = make_batch(n=12)
    with torch.inference_mode():
        users, items = three_users_and_candidates(model, batch)
        grouped = model.rank(users, items)  # 3 users x 4 candidates
        copied = model.rank({k: v.repeat_interleave(4, 0) for k, v in users.items()}, items)  # a user row per candidate: the plain path
        one = model.rank({k: v[1:2] for k, v in users.items()}, {k: v[4:8] for k, v in items.items()})  # one user broadcast
        kept = {"item_vec": items["item_vec"], "first_layer": model.item_first_layer(items)}  # what the service keeps per item: no item_part
        from_kept = model.rank(users, kept)
        single = model.rank({k: v[2:3] for k, v in users.items()}, {k: v[8:9] for k, v in kept.items()})  # one user, one candidate
    assert set(grouped) == set(copied) and "rating" in grouped
    for head in grouped:
        torch.testing.assert_close(grouped[head], copied[head], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(one[head], copied[head][4:8], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(from_kept[head], copied[head], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(single[head], copied[head][8:9], rtol=1e-5, atol=1e-6)
    assert grouped["p_click"].std() > 1e-3  # the candidates are told apart: not a constant that any path would match


def test_cross_columns_are_products_of_the_user_and_the_candidate_projections():
    """``model.cross_dim``: the ranker's last k input columns are ``user_cross([u, user_part]) * item_cross([v, item_part])``;
    zeroing the user projection (every pair's cross 0) changes the heads: the columns are read."""
    model = make_model(cross_dim=4)
    batch = make_batch(n=6)
    with torch.no_grad():
        users, items = three_users_and_candidates(model, batch)
        with_cross = model.rank(users, items)
        seen = {}
        hook = model.ranker_norm.register_forward_hook(lambda _m, args, _out: seen.update(x=args[0]))
        model.rank({k: v.repeat_interleave(2, 0) for k, v in users.items()}, items)  # the plain path, whose input the hook sees
        hook.remove()
        d = model.spec.config.dim
        user_side = torch.cat([users["user_vec"][:, :d] * d**0.5, users["user_part"]], dim=-1).repeat_interleave(2, 0)
        item_side = torch.cat([items["item_vec"][:, :d] * d**0.5, items["item_part"]], dim=-1)
        torch.testing.assert_close(seen["x"][:, -4:], model.user_cross(user_side) * model.item_cross(item_side))
        model.user_cross.weight.zero_(), model.user_cross.bias.zero_()
        without = model.rank(users, items)
    assert (with_cross["p_click"] - without["p_click"]).abs().max() > 1e-4


# -- cold items ------------------------------------------------------------------------------
def test_items_without_training_interactions_ignore_their_untrained_id_row():
    model = make_model()
    model.set_trained_items(torch.tensor([1, 2, 3]))
    model.item_cat[9:11], model.item_num[9:11] = model.item_cat[7:9], model.item_num[7:9]  # same side features
    model.item_cat[1:3], model.item_num[1:3] = model.item_cat[7:9], model.item_num[7:9]
    batch = make_batch(n=2)
    content = (batch["text"], batch["text_mask"], batch["image"], batch["image_mask"])
    cold, also_cold_same_content = model.item_vectors(torch.tensor([7, 8]), *content), model.item_vectors(torch.tensor([9, 10]), *content)
    warm = model.item_vectors(torch.tensor([1, 2]), *content)
    assert torch.allclose(cold, also_cold_same_content)  # same content and features, id rows ignored
    assert not torch.allclose(cold, warm)


def test_untrained_items_in_a_history_are_left_out_of_the_id_bag():
    model = make_model()
    model.set_trained_items(torch.tensor([1, 2, 3]))
    user, content = torch.tensor([4]), torch.randn(1, model.content_dim)  # the same history content for both
    with_cold = model.user_vectors(user, torch.tensor([[1, 2, 15, 16]]), content)
    without = model.user_vectors(user, torch.tensor([[1, 2, 0, 0]]), content)
    torch.testing.assert_close(with_cold, without)


def catalogue_content(model, seed: int = 3) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Random content for every item (item 5 has no image) and the catalogue's content vectors."""
    g = torch.Generator().manual_seed(seed)
    n = model.spec.n_items
    content = {"text": torch.randn(n, TEXT_DIM, generator=g), "text_mask": torch.ones(n), "image": torch.randn(n, IMAGE_DIM, generator=g), "image_mask": torch.ones(n)}
    content["image_mask"][5] = 0
    return content, catalogue_states(model, torch.arange(n), content)[1]


def test_a_history_of_cold_items_changes_the_user_vector_through_their_content():
    model = make_model()
    model.set_trained_items(torch.tensor([1, 2, 3]))  # 15, 16 and 17 have no trained id row
    _, content_vecs = catalogue_content(model)
    user = torch.tensor([0])  # an unknown user: the history is all it has
    def vector(history):
        history = torch.tensor([history])
        return model.user_vectors(user, history, mean_content(content_vecs, history))
    nothing = vector([0, 0, 0, 0])
    cold, other_cold = vector([15, 16, 0, 0]), vector([17, 0, 0, 0])
    assert not torch.allclose(cold, nothing, atol=1e-4) and not torch.allclose(cold, other_cold, atol=1e-4)
    blind = make_model(content_history=False)
    blind.set_trained_items(torch.tensor([1, 2, 3]))
    torch.testing.assert_close(blind.user_vectors(user, torch.tensor([[15, 16, 0, 0]])), blind.user_vectors(user, torch.zeros(1, 4, dtype=torch.int64)))


def test_the_training_path_of_the_history_content_equals_the_mean_of_the_catalogues_content_vectors():
    model = make_model()
    content, content_vecs = catalogue_content(model)
    history = torch.tensor([[1, 5, 9, 0], [5, 0, 0, 0], [0, 0, 0, 0], [20, 19, 18, 17]])  # item 5 without an image: the stand-in
    from_sums = model._history_content_from_sums({"history": history, **history_content_sums(history, content)})
    torch.testing.assert_close(from_sums, mean_content(content_vecs, history), rtol=1e-5, atol=1e-6)
    assert torch.equal(from_sums[2], torch.zeros(model.content_dim))  # an empty history has no content
    batch = {**make_batch(n=4), "history": history, **history_content_sums(history, content)}
    user_vec = model(batch)["user_vec"]  # forward reads the sums, user_state the catalogue's vectors: the same user
    torch.testing.assert_close(user_vec, model.user_vectors(batch["user_idx"], history, mean_content(content_vecs, history)), rtol=1e-5, atol=1e-6)


def test_history_id_dropout_hides_history_ids_from_the_bag_only_in_training():
    model = make_model(history_id_dropout=0.5)
    history = torch.arange(1, 21).unsqueeze(0)
    model.train()
    torch.manual_seed(0)
    pooled_train = [model._pooled(torch.tensor([1]), history, None)[0]["history"] for _ in range(2)]
    model.eval()
    pooled_eval = [model._pooled(torch.tensor([1]), history, None)[0]["history"] for _ in range(2)]
    assert not torch.allclose(pooled_train[0], pooled_train[1])  # a different random share hidden each time
    torch.testing.assert_close(pooled_eval[0], pooled_eval[1])


def test_id_dropout_hides_item_ids_only_in_training():
    model = make_model(id_dropout=0.5)
    items = torch.arange(1, 21)
    model.train()
    torch.manual_seed(0)
    hidden = (model.item_tower.id_lookup(items) == 0).float().mean().item()
    model.eval()
    assert 0.25 < hidden < 0.75
    assert torch.equal(model.item_tower.id_lookup(items), items)


def test_item_feature_values_no_trained_item_has_are_looked_up_as_unknown():
    model = make_model()
    model.set_trained_items(torch.tensor([1, 2]))
    model.item_cat[0, 0], model.item_cat[1:3, 0] = 0, 1  # row 0 (padding) counts as trained: give it no value
    model.item_cat[7, 0], model.item_cat[8, 0] = 1, 2  # item 7 shares a trained item's value; item 8's value is unseen
    assert model.item_tower.categorical_lookup(torch.tensor([7, 8])).tolist() == [[1], [0]]
    model.item_cat[8, 0] = 0
    before = model.item_vectors(torch.tensor([8]))
    model.item_cat[8, 0] = 2  # an unseen value is the same as no value
    torch.testing.assert_close(model.item_vectors(torch.tensor([8])), before)


def test_dwa_weights_follow_the_softmax_of_loss_ratios_over_two_epochs():
    weighting = TaskWeighting(["click", "rating"], "dwa")
    assert weighting.weights() == {"click": 1.0, "rating": 1.0}
    weighting.end_epoch({"click": 0.6, "rating": 2.0})
    assert weighting.weights() == {"click": 1.0, "rating": 1.0}  # one epoch: no ratio yet
    weighting.end_epoch({"click": 0.3, "rating": 1.8})  # ratios 0.5 and 0.9: rating fell less, it gets more weight
    e_click, e_rating = math.exp(0.5 / 2), math.exp(0.9 / 2)
    expected = {"click": 2 * e_click / (e_click + e_rating), "rating": 2 * e_rating / (e_click + e_rating)}
    assert weighting.weights() == pytest.approx(expected, rel=1e-6)
    total = weighting({"click": torch.tensor(1.0), "rating": torch.tensor(2.0)})
    torch.testing.assert_close(total, torch.tensor(expected["click"] * 1.0 + expected["rating"] * 2.0))
    restored = TaskWeighting(["click", "rating"], "dwa")
    restored.load_state_dict(weighting.state_dict())  # resumable: the epoch losses travel in the checkpoint
    assert restored.weights() == pytest.approx(expected, rel=1e-6)


def test_wide_histories_keep_their_last_items():
    from recsys.model import fit_history

    history = torch.tensor([[1, 2, 3, 4, 5, 6, 0], [7, 8, 0, 0, 0, 0, 0]])
    assert fit_history(history, 4).tolist() == [[3, 4, 5, 6], [7, 8, 0, 0]]
    assert fit_history(history[:, :3], 5).tolist() == [[1, 2, 3, 0, 0], [7, 8, 0, 0, 0]]


def test_stop_gradient_keeps_the_ranker_loss_out_of_the_towers():
    batch = make_batch()
    for stop, reaches in ((True, False), (False, True)):
        model = make_model(ranker_stop_gradient=stop)
        model(batch)["logit_click"].sum().backward()
        grad = model.user_tower.mlp[-1].weight.grad
        assert (grad is not None and bool(grad.abs().sum() > 0)) == reaches, stop
        assert model.ranker.towers["click"][-1].weight.grad is not None  # the ranker itself still learns


def test_recent_columns_come_out_as_one_view_equal_to_each_position_and_fall_back_when_reordered():
    from torchrec import KeyedTensor

    model = make_model().train()
    users, history, items = torch.tensor([0, 3, 7]), torch.tensor([[2, 5, 0, 0, 0], [1, 2, 3, 5, 7], [0, 0, 0, 0, 0]]), torch.tensor([3, 0, 9])
    keys = [*model.user_tower.lookup(users), *model.item_tower.lookup(items), *model.recent_keys]
    ids = torch.cat([*model.user_tower.lookup(users).values(), *model.item_tower.lookup(items).values(), fit_history(history, len(model.recent_keys))], dim=1)
    pooled = model.embedding_tables(ids_to_kjt(keys, ids, "history", history))
    merged = model._by_key(pooled)
    assert "recent" in merged and not any(key in merged for key in model.recent_keys)
    for j, key in enumerate(model.recent_keys):
        torch.testing.assert_close(merged["recent"][:, j], pooled[key])
    # a sharding that reorders the columns (here: reversed): one piece per position, stacked by _user_state
    order = list(reversed(pooled.keys()))
    reordered = KeyedTensor.from_tensor_list(order, [pooled[key] for key in order])
    apart = model._by_key(reordered)
    assert "recent" not in apart and all(key in apart for key in model.recent_keys)
    recent = fit_history(history, len(model.recent_keys))
    content = torch.zeros(3, model.content_dim)
    torch.testing.assert_close(model._user_state(apart, users, recent, content)["history_keys"], model._user_state(merged, users, recent, content)["history_keys"])


def test_inference_reads_the_same_embeddings_as_the_kjt_pass():
    model = make_model()
    model.set_trained_items(torch.tensor([1, 2, 3, 5, 7]))
    users, history, items = torch.tensor([0, 3, 7]), torch.tensor([[2, 5, 0, 0, 0], [1, 2, 3, 5, 7], [0, 0, 0, 0, 0]]), torch.tensor([3, 0, 9])
    content = torch.randn(3, model.content_dim)
    assert not model._direct_lookup()  # autograd on: the KJT pass
    kjt_user, kjt_item = model.user_state(users, history, content), model.item_state(items)
    kjt_pooled = model._pooled(users, history, items)[0]
    with torch.inference_mode():
        assert model._direct_lookup()
        direct_user, direct_item = model.user_state(users, history, content), model.item_state(items)
        direct_pooled = model._pooled(users, history, items)[0]
    assert set(direct_pooled) == set(kjt_pooled) and "recent" in kjt_pooled  # both read the attention positions as one (B, A, E) block
    for key in kjt_pooled:
        torch.testing.assert_close(direct_pooled[key], kjt_pooled[key].detach(), msg=key)
    for kjt, direct in ((kjt_user, direct_user), (kjt_item, direct_item)):
        for key in kjt:
            torch.testing.assert_close(direct[key], kjt[key].detach(), msg=key)
    model.train()
    assert not model._direct_lookup()
