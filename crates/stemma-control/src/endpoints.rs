//! Endpoints and scale to zero: the branch ports the proxy serves, waking computes on
//! connect, and suspending idle ones.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use stemma_proxy::{Backend, BoxFuture, Refusal, Route, Upstream};

use crate::engine::Engine;
use crate::metadata::BranchRow;
use crate::{ControlError, Result};

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Engine {
    pub(crate) fn gate(&self, branch_id: i64) -> Arc<tokio::sync::RwLock<()>> {
        lock(&self.gates).entry(branch_id).or_default().clone()
    }

    /// Serves the branch's port through the proxy. A port held by another program is an error
    /// (recorded so `branch get` shows it).
    pub(crate) async fn open_endpoint(&self, b: &BranchRow) -> Result<()> {
        let Some(proxy) = self.proxy.get() else {
            return Ok(());
        };
        let route = Route {
            key: Self::compute_key(b),
            branch: b.name.clone(),
        };
        match proxy.listen_branch(b.port, route).await {
            Ok(()) => {
                lock(&self.endpoint_errors).remove(&b.id);
                Ok(())
            }
            Err(e) => {
                let msg = format!(
                    "port {} of branch {:?} is already in use by another program ({e}); free it and restart the daemon",
                    b.port, b.name
                );
                lock(&self.endpoint_errors).insert(b.id, msg.clone());
                Err(ControlError::Conflict(msg))
            }
        }
    }

    /// Stops serving a branch's port and ends its connections with `message`.
    pub(crate) fn close_endpoint(&self, b: &BranchRow, message: &str) {
        if let Some(proxy) = self.proxy.get() {
            proxy.remove_branch(&Self::compute_key(b), message);
        }
        lock(&self.endpoint_errors).remove(&b.id);
    }

    /// Makes sure the compute of branch `key` runs; the proxy calls this for each connection.
    pub(crate) async fn wake(&self, key: &str) -> std::result::Result<Upstream, Refusal> {
        let refuse = |sqlstate, message: String| Refusal { sqlstate, message };
        let id = Self::branch_id_of_key(key)
            .ok_or_else(|| refuse("3D000", format!("unknown endpoint {key}")))?;
        let gate = self.gate(id);
        let _shared = gate.read().await;
        let b = match self.meta.branch_by_id(id) {
            Ok(Some(b)) => b,
            Ok(None) => return Err(refuse("3D000", "this branch no longer exists".into())),
            Err(e) => return Err(refuse("XX000", format!("reading metadata: {e:#}"))),
        };
        // Its first start promotes it, with a transient trust rule: nothing connects then.
        if self.promotion_pending(&b.timeline_id) {
            return Err(refuse(
                "57P03",
                format!(
                    "branch \"{}\" is being created; try again in a moment",
                    b.name
                ),
            ));
        }
        if let Some(info) = self.supervisor.info(key) {
            return Ok(upstream_of(info));
        }
        // A cold start. One at a time, so the cap on running computes holds.
        let _cold = self.wake_lock.lock().await;
        if let Some(info) = self.supervisor.info(key) {
            return Ok(upstream_of(info));
        }
        let started = Instant::now();
        if let Err(r) = self.make_room(key).await {
            self.metrics.wake_refusals.inc();
            return Err(r);
        }
        let spec = self
            .compute_spec(&b)
            .map_err(|e| refuse("XX000", e.to_string()))?;
        match self.supervisor.start(spec).await {
            Ok(info) => {
                self.metrics
                    .cold_starts
                    .observe(started.elapsed().as_secs_f64());
                if let Err(e) = self.meta.set_compute_running(id, true) {
                    tracing::warn!(error = %e, "recording the compute's state");
                }
                tracing::info!(branch = %b.name, ms = started.elapsed().as_millis() as u64, "woke compute");
                Ok(upstream_of(info))
            }
            Err(e) => {
                self.metrics.wake_refusals.inc();
                Err(refuse(
                    "57P03",
                    format!("the compute of branch \"{}\" could not start: {e}", b.name),
                ))
            }
        }
    }

    /// When the cap on running computes is reached, suspends the least recently used idle
    /// compute; fails when none is idle.
    pub(crate) async fn make_room(&self, waking: &str) -> std::result::Result<(), Refusal> {
        let Some(proxy) = self.proxy.get() else {
            return Ok(());
        };
        let max = self.cfg.max_computes;
        // Bounded: each round suspends one compute or returns.
        for _ in 0..=max {
            let running = self.supervisor.list();
            if running.len() < max {
                return Ok(());
            }
            let mut idle: Vec<(Instant, String)> = running
                .iter()
                .filter(|c| c.key != waking)
                // A compute that never suspends (a source's standby) is not evicted either.
                .filter(|c| {
                    Self::branch_id_of_key(&c.key)
                        .and_then(|id| self.meta.branch_by_id(id).ok().flatten())
                        .is_none_or(|b| b.suspend_timeout_secs != Some(0))
                })
                .filter_map(|c| {
                    let a = proxy.activity(&c.key);
                    (a.open == 0).then_some((a.last_change, c.key.clone()))
                })
                .collect();
            idle.sort();
            let mut suspended = false;
            for (_, key) in idle {
                if self
                    .suspend(&key, "the cap on running computes was reached")
                    .await
                {
                    suspended = true;
                    break;
                }
            }
            if !suspended {
                return Err(Refusal {
                    sqlstate: "53300",
                    message: format!(
                        "too many computes are running ({max}, the configured cap) and none is idle; close connections to other branches or raise --max-computes"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Suspends the compute of `key` if no operation holds its branch and it is still idle.
    /// Returns whether it was suspended.
    async fn suspend(&self, key: &str, why: &str) -> bool {
        let Some(id) = Self::branch_id_of_key(key) else {
            return false;
        };
        let gate = self.gate(id);
        let Ok(_exclusive) = gate.try_write() else {
            return false;
        };
        let Ok(Some(b)) = self.meta.branch_by_id(id) else {
            return false;
        };
        if self.proxy.get().is_some_and(|p| p.activity(key).open > 0) {
            return false;
        }
        let Ok(spec) = self.compute_spec(&b) else {
            return false;
        };
        match self.supervisor.stop(key, &spec.data_dir).await {
            Ok(()) => {
                self.metrics.suspensions.inc();
                if let Err(e) = self.meta.set_compute_running(id, false) {
                    tracing::warn!(error = %e, "recording the compute's state");
                }
                tracing::info!(branch = %b.name, why, "compute suspended");
                true
            }
            Err(e) => {
                tracing::warn!(branch = %b.name, error = %e, "suspending the compute failed");
                false
            }
        }
    }

    /// One pass of the suspender: every running compute idle for longer than its branch's
    /// suspend timeout (the daemon's default when unset; 0 never suspends) is stopped.
    pub async fn suspend_idle(&self) -> usize {
        let Some(proxy) = self.proxy.get() else {
            return 0;
        };
        // Operations (clones read a running parent) hold the operation lock: skip this round.
        let Ok(_op) = self.op_lock.try_lock() else {
            return 0;
        };
        let mut n = 0;
        for c in self.supervisor.list() {
            let Some(id) = Self::branch_id_of_key(&c.key) else {
                continue;
            };
            let Ok(Some(b)) = self.meta.branch_by_id(id) else {
                continue;
            };
            let timeout = b
                .suspend_timeout_secs
                .map(Duration::from_secs)
                .unwrap_or(self.cfg.suspend_timeout);
            if timeout.is_zero() {
                continue;
            }
            let a = proxy.activity(&c.key);
            if a.open == 0
                && a.last_change.elapsed() >= timeout
                && self.suspend(&c.key, "idle").await
            {
                n += 1;
            }
        }
        n
    }
}

/// The proxy's view of the engine. Weak, so the engine and the proxy do not keep each other.
pub(crate) struct ProxyBackend(pub Weak<Engine>);

impl Backend for ProxyBackend {
    fn resolve(&self, name: &str) -> Option<Route> {
        let engine = self.0.upgrade()?;
        let b = engine.meta.branch(name).ok()??;
        Some(Route {
            key: Engine::compute_key(&b),
            branch: b.name,
        })
    }

    fn wake<'a>(
        &'a self,
        route: &'a Route,
    ) -> BoxFuture<'a, std::result::Result<Upstream, Refusal>> {
        Box::pin(async move {
            match self.0.upgrade() {
                Some(engine) => engine.wake(&route.key).await,
                None => Err(Refusal {
                    sqlstate: "57P01",
                    message: "the Stemma daemon is shutting down".into(),
                }),
            }
        })
    }
}

fn upstream_of(info: stemma_compute::ComputeInfo) -> Upstream {
    Upstream {
        socket: info.socket_path,
        tcp: info.tcp_addr,
    }
}
