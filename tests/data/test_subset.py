import numpy as np

from clinadapt.data.dataset import Subset


def test_subset_reads_only_the_chosen_items(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.arange(5 * 2 * 2).reshape(5, 2, 2))
    source = np.load(path, mmap_mode="r")
    view = Subset(source, np.array([4, 1]))
    assert len(view) == 2 and view.shape == (2, 2, 2)
    np.testing.assert_array_equal(view[0], source[4])
    np.testing.assert_array_equal(view[np.array([1, 0])], source[[1, 4]])
