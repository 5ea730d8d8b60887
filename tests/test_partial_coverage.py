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


def test_partial_coverage_figure_draws_the_results_data():
    """The figure shows the Result's numbers: bar heights, trajectory curves and simplex points."""
    res = pc.run(pc.Config.quick())
    fig = pc.figure(res)
    bars_ax, traj_ax, simplex_ax = fig.axes
    # panel 1: four groups of three bars, in the order pi_ref, RLHF, DPO on supp(pi_ref), feature-sharing DPO
    heights = np.array([b.get_height() for b in bars_ax.patches])
    want = np.concatenate([res.pi_ref, res.rlhf, res.dpo_ref_support, res.trajectory[-1]])
    np.testing.assert_array_equal(heights, want)
    # panel 2: one curve per completion along the DPO steps, and RLHF's pi(xi3) as a reference line
    lines = traj_ax.get_lines()
    for k in range(3):
        np.testing.assert_array_equal(lines[k].get_ydata(), res.trajectory[:, k])
        np.testing.assert_array_equal(lines[k].get_xdata(), np.arange(res.trajectory.shape[0]))
    assert lines[3].get_ydata()[0] == res.rlhf[2]
    # panel 3: the trajectory in barycentric coordinates of the simplex's corners
    corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]])
    xy = res.trajectory @ corners
    run = [ln for ln in simplex_ax.get_lines() if ln.get_label() == "feature-sharing DPO run"]
    assert len(run) == 1
    np.testing.assert_allclose(run[0].get_xdata(), xy[:, 0], rtol=0, atol=4 * np.finfo(float).eps)
    np.testing.assert_allclose(run[0].get_ydata(), xy[:, 1], rtol=0, atol=4 * np.finfo(float).eps)
