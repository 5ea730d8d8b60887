"""The slides' partial-coverage counterexample, asserted at a small size."""

import numpy as np

from toyrlhf.experiments import partial_coverage as pc


def test_partial_coverage_claims():
    res = pc.run(pc.Config.quick())
    # RLHF: the MLE is not attained (separable data) and its policy stays on pi_ref's support
    assert not res.rlhf_attained
    assert res.rlhf[2] == 0.0 and res.rlhf[0] > 1 - 1e-12
    np.testing.assert_allclose(res.dpo_ref_support, res.rlhf, atol=1e-12)
    # DPO over the unrestricted class: every point of the edge {pi(xi2)=0} has the same (near-infimal) loss
    assert np.ptp(res.edge_loss) < 1e-15 and res.edge_loss.max() < 1e-15
    assert res.edge[:, 2].min() < 0.05 and res.edge[:, 2].max() > 0.95
    # feature-sharing DPO: loss decreases monotonically while most mass moves to the unseen xi3
    assert np.all(np.diff(res.trajectory_loss) < 0)
    assert res.trajectory[-1, 2] > 0.5 > res.trajectory[0, 2]
    assert res.trajectory[-1, 1] < 1e-3


def test_partial_coverage_figure_draws_three_panels():
    res = pc.run(pc.Config.quick())
    fig = pc.figure(res)
    assert len(fig.axes) == 3
    bars = [p.get_height() for p in fig.axes[0].patches]
    assert len(bars) == 12 and max(bars) <= 1.0 + 1e-12
