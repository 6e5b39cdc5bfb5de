#!/usr/bin/env bash
# The RayJob's entrypoint, installed in the image as `dippipe-entrypoint`:
#   dippipe-entrypoint MANIFEST --out OUT [dippipe run options...]
# runs `dippipe run` with those arguments and turns its exit code (pipeline/exit_codes.py)
# into what KubeRay should do. KubeRay v1.7.0 retries a RayJob whose Ray job FAILED (any
# non-zero exit of this script) on a brand-new cluster, up to spec.backoffLimit times, and
# cannot fail a RayJob without retrying it. So a code that no rerun can fix must exit 0 here,
# or one corrupt image / a wrong URI costs backoffLimit cluster start-ups for nothing:
#
#   dippipe   meaning                                        this script  KubeRay
#   0         every job ok                                   0            done
#   1         some job failed on its own input (rows in      0            done, not retried
#             OUT/results; `dippipe report` lists them)
#   2         unusable manifest or option: nothing ran       0            done, not retried
#   3         infrastructure (storage unreachable, refused   3            retried: resumes
#             or full, OUT locked by another live run,
#             workers keep failing, no worker within
#             --worker-wait)
#   4         internal error of dippipe (a defect)           4            retried; stays visible
#   130       interrupted (SIGTERM / SIGINT)                 130          retried: resumes
#   other     killed (137 = SIGKILL / out of memory, ...)    same         retried: resumes
#
# The codes that end the RayJob as done are DIPPIPE_FINAL_CODES (default "1 2"). The last line
# of the log always names dippipe's own code, so `kubectl logs` shows what really happened.
#
# Lock takeover: with DIPPIPE_RAYJOB set (the RayJob's name, see deploy/kuberay/rayjob.yaml)
# and DIPPIPE_NAMESPACE (the head pod's namespace, downward API), DIPPIPE_OWNER_ID becomes
# "rayjob/<namespace>/<name>": a retry of the same RayJob on a new cluster (new head, new host
# name) then takes over its own lock on OUT (pipeline/lock.py) instead of exiting 3.
# An interactive `ray job submit` sets no DIPPIPE_RAYJOB, hence no owner: never a takeover.
set -u

if [ -z "${DIPPIPE_OWNER_ID:-}" ] && [ -n "${DIPPIPE_RAYJOB:-}" ]; then
    export DIPPIPE_OWNER_ID="rayjob/${DIPPIPE_NAMESPACE:-default}/${DIPPIPE_RAYJOB}"
fi
final_codes=" ${DIPPIPE_FINAL_CODES:-1 2} "

# Ray stops a job by signalling this script and its children (RAY_JOB_STOP_SIGNAL, SIGTERM by
# default), then SIGKILLs whatever still runs RAY_JOB_STOP_WAIT_TIME_S later. dippipe gets the
# signal itself; the traps only keep this script alive to report dippipe's code.
child=""
forward() { [ -n "$child" ] && kill -s "$1" "$child" 2>/dev/null; }
trap 'forward TERM' TERM
trap 'forward INT' INT

"${DIPPIPE:-dippipe}" run "$@" &
child=$!
while :; do
    wait "$child"
    code=$?
    # `wait` returns early (> 128) when a trapped signal arrives; dippipe may still be
    # flushing its results. A zombie still answers kill -0, so its code is never lost.
    kill -0 "$child" 2>/dev/null || break
done

case "$code" in
    0) meaning="every job ok" ;;
    1) meaning="some jobs failed on their own input (see OUT/results, dippipe report)" ;;
    2) meaning="unusable manifest or option: nothing ran" ;;
    3) meaning="stopped by the infrastructure (storage, OUT's lock, workers); a rerun resumes" ;;
    4) meaning="internal error of dippipe (please report it)" ;;
    130) meaning="interrupted; a rerun resumes" ;;
    *) meaning="killed or crashed (signal $((code > 128 ? code - 128 : 0)))" ;;
esac
if [ "$code" -ne 0 ] && [[ "$final_codes" == *" $code "* ]]; then
    echo "dippipe-entrypoint: dippipe exited $code ($meaning); exiting 0: a retry on a" \
        "new cluster cannot fix this" >&2
    exit 0
fi
if [ "$code" -eq 0 ]; then
    echo "dippipe-entrypoint: dippipe exited 0 ($meaning)" >&2
else
    echo "dippipe-entrypoint: dippipe exited $code ($meaning); exiting $code: KubeRay" \
        "retries the RayJob on a new cluster while backoffLimit allows" >&2
fi
exit "$code"
