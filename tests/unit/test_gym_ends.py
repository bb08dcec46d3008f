"""The gym envs' end of an episode (client/gym.ends): drawn with the model's done probability when sampling,
done > 0.5 when greedy; truncated at max_steps only when not terminated."""

import numpy as np

from worldserve.client.client import Event
from worldserve.client.gym import ends


def test_a_sampled_world_ends_with_probability_done_from_the_envs_seeded_generator():
    rng = np.random.default_rng(0)
    for p in (0.05, 0.3, 0.8):
        ev = Event(0, 0, 0.0, p)
        hits = [ends(ev, 1, 64, rng, temperature=1.0)[0] for _ in range(20_000)]
        assert abs(np.mean(hits) - p) < 0.015, p
    def episode_ends(seed):
        g = np.random.default_rng(seed)
        return [ends(Event(0, 0, 0.0, 0.3), 1, 64, g, 1.0)[0] for _ in range(50)]

    assert episode_ends(7) == episode_ends(7) != episode_ends(8)  # seeded: a replay ends where it ended


def test_a_greedy_world_ends_past_one_half_and_truncation_needs_no_end():
    rng = np.random.default_rng(0)
    assert ends(Event(0, 0, 0.0, 0.51), 1, 64, rng, 0.0) == (True, False)
    assert ends(Event(0, 0, 0.0, 0.49), 1, 64, rng, 0.0) == (False, False)
    assert ends(Event(0, 0, 0.0, 0.49), 64, 64, rng, 0.0) == (False, True)
    assert ends(Event(0, 0, 0.0, 0.99), 64, 64, rng, 0.0) == (True, False)
