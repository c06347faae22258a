#!/usr/bin/env bash
# Kind end-to-end: a real cluster, the image built from the Dockerfile, the
# chart, an app, traffic through its front Service while a pod is deleted and
# another is made unready; no request may fail and the replica count must heal.
#
# Needs Docker, kind, kubectl and helm. Usage:
#   tests/e2e/kind.sh deploy   # cluster + image + chart + manifests/examples/minimal.yaml (the quickstart)
#   tests/e2e/kind.sh test     # deploy, then the end-to-end checks
#   tests/e2e/kind.sh delete   # remove the cluster
set -euo pipefail

CLUSTER=${CLUSTER:-fulcrum}
IMAGE=${IMAGE:-fulcrum:e2e}
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion), as a kind
# node image of kind v0.29: the cluster must not drift with kind's default.
NODE_IMAGE=${NODE_IMAGE:-kindest/node:v1.33.1}
NAMESPACE=fulcrum-system
cd "$(dirname "$0")/../.."

need() { command -v "$1" >/dev/null || { echo "kind.sh: $1 is required" >&2; exit 1; }; }
log() { printf '\n== %s\n' "$*"; }

deploy() {
  need docker; need kind; need kubectl; need helm
  if ! kind get clusters | grep -qx "$CLUSTER"; then
    log "creating the kind cluster $CLUSTER"
    kind create cluster --name "$CLUSTER" --image "$NODE_IMAGE" --wait 180s
  fi
  kubectl config use-context "kind-$CLUSTER"
  log "building $IMAGE and loading it into the cluster"
  docker build -t "$IMAGE" .
  kind load docker-image "$IMAGE" --name "$CLUSTER"
  log "installing the chart"
  helm upgrade --install fulcrum charts/fulcrum \
    --namespace "$NAMESPACE" --create-namespace \
    --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" \
    --wait --timeout 180s
  kubectl -n "$NAMESPACE" rollout status deployment/fulcrum --timeout 120s
  log "applying manifests/examples/minimal.yaml"
  kubectl apply -f manifests/examples/minimal.yaml
  kubectl wait lba/web --for=condition=Available --timeout 240s
  kubectl get lba web
}

# Running app pods that are not terminating (a terminating pod stays Running
# until its containers exit).
app_pods() {
  kubectl get pods -l fulcrum.dev/app=e2e,fulcrum.dev/track=stable --field-selector=status.phase=Running \
    -o go-template='{{range .items}}{{if not .metadata.deletionTimestamp}}{{.metadata.name}}{{"\n"}}{{end}}{{end}}'
}

ready_count() {
  kubectl get lba e2e -o jsonpath='{.status.readyReplicas}'
}

test_e2e() {
  deploy
  log "applying the end-to-end app"
  kubectl apply -f tests/e2e/kind-app.yaml
  kubectl wait lba/e2e --for=condition=Available --timeout 240s
  kubectl rollout status deployment/e2e --timeout 180s

  log "sending traffic through service/e2e for 90 s"
  kubectl delete pod e2e-load --ignore-not-found --wait
  # The loop runs in the pod's shell: its variables must not expand here.
  # shellcheck disable=SC2016
  kubectl run e2e-load --restart=Never --image=docker.io/curlimages/curl:8.11.1 -- sh -c '
    ok=0; fail=0; end=$(( $(date +%s) + 90 ))
    while [ "$(date +%s)" -lt "$end" ]; do
      if curl -fsS -m 2 -o /dev/null http://e2e/hostname; then ok=$((ok+1)); else fail=$((fail+1)); fi
    done
    echo "ok=$ok fail=$fail"'
  kubectl wait pod/e2e-load --for=condition=Ready --timeout 60s
  sleep 10

  victim=$(app_pods | head -n 1)
  log "deleting pod $victim"
  kubectl delete pod "$victim" --wait=false
  sleep 15

  unready=$(app_pods | tail -n 1)
  log "making pod $unready unready (it must leave the proxies within a second, then be replaced after 20 s)"
  kubectl exec "$unready" -c app -- rm /tmp/ready
  for _ in $(seq 1 60); do
    if ! kubectl get pod "$unready" >/dev/null 2>&1; then break; fi
    sleep 2
  done
  if kubectl get pod "$unready" >/dev/null 2>&1; then
    echo "FAIL: the unready pod $unready was not replaced" >&2; exit 1
  fi

  log "waiting for the load to finish"
  kubectl wait pod/e2e-load --for=jsonpath='{.status.phase}'=Succeeded --timeout 120s
  result=$(kubectl logs e2e-load | tail -n 1)
  echo "$result"
  case "$result" in
    ok=*" fail=0") ;;
    *) echo "FAIL: requests failed through the proxy: $result" >&2; exit 1 ;;
  esac
  for _ in $(seq 1 60); do
    [ "$(ready_count)" = "3" ] && break
    sleep 2
  done
  [ "$(ready_count)" = "3" ] || { echo "FAIL: the app did not heal back to 3 ready replicas" >&2; exit 1; }
  kubectl get lba e2e
  log "PASS: no failed request, a deleted and an unready pod replaced, 3 ready replicas"
}

case "${1:-test}" in
  deploy) deploy ;;
  test) test_e2e ;;
  delete) need kind; kind delete cluster --name "$CLUSTER" ;;
  *) echo "usage: $0 [deploy|test|delete]" >&2; exit 2 ;;
esac
