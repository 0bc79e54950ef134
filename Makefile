# Two commands on a fresh machine (Debian, Python 3.10+, root or sudo):
#   make demo   installs what is needed, renders the dataset, runs the four jobs, prints mAP@all
#   make test   installs what is needed and runs the test suite (what .ci/run calls)
# The environment (Debian packages + a venv keyed by pyproject.toml) is set up by
# scripts/bootstrap.sh on first use and reused afterwards.
CONF ?= conf/local.yaml

.PHONY: demo test test-cluster env

env:
	scripts/with-env.sh python -c "import audiohash, pyspark, torch, faiss, mlflow; print('environment ready')"

demo:
	scripts/with-env.sh scripts/demo.sh $(CONF)

# Everything, the standalone-cluster tests included (tests/test_cluster.py: a real master and
# two workers on loopback, worker loss; about 10 minutes), two xdist workers, a test file each,
# handed out in collection order (--no-loadscope-reorder: xdist would otherwise start the files
# with the most tests first, and the cluster file, few tests but the longest, would start last).
# OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads (faiss's and torch's runtimes) sleep instead of
# spinning; with two workers on two cores the spinning made training tests 8x slower (README, Tests).
# AUDIOHASH_EXTRA_APT: Debian packages only the tests need (the listening page's browser test).
test:
	AUDIOHASH_EXTRA_APT="chromium chromium-driver" OMP_WAIT_POLICY=PASSIVE scripts/with-env.sh python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --no-loadscope-reorder

test-cluster:
	scripts/with-env.sh python -m pytest -q -p no:cacheprovider -m cluster

# The project code as one zip for a Spark cluster (spark-submit --py-files dist/audiohash.zip ...).
.PHONY: package
package:
	scripts/package.sh dist/audiohash.zip
