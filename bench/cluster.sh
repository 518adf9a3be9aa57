# Shared by bench/run and bench/soak (sourced): starts a private etcd, three
# torusd with replication 2 and one torusblk on loopback, from release builds
# (or the binaries in $BENCH_BIN), with fresh data dirs under $work. Sets:
# bin, nbd (its port), torus_pids; appends every started process to pids (for the caller's cleanup trap).

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }

start_torus() {
  if [ -n "${BENCH_BIN:-}" ]; then # binaries built elsewhere (before/after comparisons)
    bin=$BENCH_BIN
  else
    echo "==> building release binaries" >&2
    cargo build --release --bins -q
    bin=$repo/target/release
  fi
  rm -rf "$work"; mkdir -p "$work"
  export TORUS_ETCD; TORUS_ETCD=$(scripts/etcd-start "$work/etcd")
  pids+=("$(cat "$work/etcd/etcd.pid")")
  export TORUS_ETCD_PREFIX=/bench
  "$bin/torusctl" init --replication 2 >/dev/null
  torus_pids=()
  for i in 1 2 3; do
    local port; port=$(free_port)
    "$bin/torusd" --data-dir "$work/node$i" --size 8GiB --peer-address "127.0.0.1:$port" > "$work/node$i.log" 2>&1 &
    pids+=($!); torus_pids+=($!)
    wait_port "$port"
  done
  for _ in $(seq 1 100); do [ "$("$bin/torusctl" list-peers -o json | grep -c in_ring)" -ge 3 ] && break; sleep 0.1; done
  "$bin/torusctl" peer add --all-peers >/dev/null
  "$bin/torusctl" volume create-block bench 2GiB >/dev/null
  nbd=$(free_port)
  "$bin/torusblk" nbdserve --listen "127.0.0.1:$nbd" > "$work/torusblk.log" 2>&1 &
  pids+=($!); torus_pids+=($!)
  wait_port "$nbd"
}
