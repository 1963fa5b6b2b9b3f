"""fastconv's asv suite: time_* and peakmem_* over shape x op x backend x dtype (see asv.conf.json).

asv runs today's benchmarks against old commits: these files keep their own shapes (they never import
fastconv.suite) and skip, with NotImplementedError, whatever the installed version lacks.
"""
