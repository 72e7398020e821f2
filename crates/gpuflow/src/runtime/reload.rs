//! Config reload (`gpuflow reload`, `POST /v1/reload`, SIGHUP). What can change while jobs run
//! changes for new work; what cannot is refused with the reason, and the running config stays.
//!
//! Jobs already accepted keep the pipeline definition they were accepted under (the same rule
//! as after a restart); new jobs, and so their attempts, use the new one.

use std::sync::Arc;

use crate::config::Config;
use crate::gpu::NvmlProbe;

use super::*;

impl<S: Store> Runtime<S> {
    pub(super) fn reload(&mut self) -> Result<Vec<String>, EngineError> {
        let path = self
            .config
            .path
            .clone()
            .ok_or_else(|| EngineError::ReloadRefused("the engine was not started from a file".into()))?;
        let new = Config::load(&path, &NvmlProbe)
            .map_err(|e| EngineError::ReloadRefused(format!("the file has errors:\n{e}")))?;
        let old = self.config.clone();

        let mut refused = Vec::new();
        fn needs_restart(refused: &mut Vec<String>, field: &str, changed: bool) {
            if changed {
                refused.push(format!("`{field}` changed; that needs a restart"));
            }
        }
        needs_restart(&mut refused, "listen", old.listen != new.listen);
        needs_restart(&mut refused, "data_dir", old.data_dir != new.data_dir);
        needs_restart(&mut refused, "resources.gpus", old.gpus != new.gpus);
        needs_restart(&mut refused, "resources.cpu", old.capacity.cpu != new.capacity.cpu);
        let plain = |c: &Config| {
            c.capacity
                .counters
                .iter()
                .filter(|(k, _)| !k.starts_with("pool:"))
                .map(|(k, v)| (k.clone(), *v))
                .collect::<Vec<_>>()
        };
        needs_restart(&mut refused, "resources.counters", plain(&old) != plain(&new));
        needs_restart(
            &mut refused,
            "limits.max_request_body",
            old.limits.max_request_body != new.limits.max_request_body,
        );
        for name in old.workers.keys().chain(new.workers.keys()) {
            match (old.workers.get(name), new.workers.get(name)) {
                (Some(a), Some(b)) => {
                    let same_devices = a.slots.iter().zip(&b.slots).all(|(x, y)| x == y)
                        && a.slots.first().map(Option::is_some) == b.slots.first().map(Option::is_some);
                    needs_restart(&mut refused, &format!("workers.{name}.command"), a.command != b.command);
                    needs_restart(&mut refused, &format!("workers.{name}.needs"), a.needs != b.needs);
                    needs_restart(&mut refused, &format!("workers.{name}.env"), a.env != b.env);
                    needs_restart(&mut refused, &format!("workers.{name}.workdir"), a.workdir != b.workdir);
                    needs_restart(&mut refused, &format!("workers.{name}.per_gpu"), !same_devices);
                }
                (None, Some(_)) => refused.push(format!("pool `{name}` is new; adding a pool needs a restart")),
                (Some(_), None) => refused.push(format!("pool `{name}` was removed; removing a pool needs a restart")),
                (None, None) => {}
            }
        }
        refused.dedup();
        if !refused.is_empty() {
            return Err(EngineError::ReloadRefused(refused.join("; ")));
        }

        // Pools first: a resize that does not fit refuses the whole reload.
        let mut applied = Vec::new();
        let mut resized = Vec::new();
        for (name, def) in &new.workers {
            match self.resize_pool(name, def.clone()) {
                Ok(change) => {
                    resized.push(name.clone());
                    applied.extend(change);
                }
                Err(e) => {
                    // Put back the pools already resized, so nothing of this reload sticks.
                    for done in &resized {
                        let _ = self.resize_pool(done, old.workers[done].clone());
                    }
                    return Err(EngineError::ReloadRefused(e));
                }
            }
            let a = &old.workers[name];
            if a.startup_timeout_ms != def.startup_timeout_ms
                || a.heartbeat_timeout_ms != def.heartbeat_timeout_ms
                || a.max_tasks_per_instance != def.max_tasks_per_instance
                || a.prefetch != def.prefetch
            {
                applied.push(format!("workers.{name}: timeouts, max_tasks_per_instance and prefetch"));
            }
            if a.batch != def.batch {
                // Batches form by the new setting from now on; the pool counter follows it.
                applied.push(format!("workers.{name}.batch: {:?} -> {:?}", a.batch, def.batch));
            }
        }
        for (name, def) in &new.pipelines {
            match old.pipelines.get(name) {
                None => applied.push(format!("pipelines.{name}: added")),
                Some(o) if format!("{o:?}") != format!("{def:?}") => {
                    applied.push(format!("pipelines.{name}: changed (for new jobs)"))
                }
                _ => {}
            }
        }
        applied.extend(
            old.pipelines
                .keys()
                .filter(|k| !new.pipelines.contains_key(*k))
                .map(|k| format!("pipelines.{k}: removed (its unfinished jobs still finish)")),
        );
        if format!("{:?}", old.limits) != format!("{:?}", new.limits) {
            applied.push("limits".into());
        }
        if old.scheduler.reserve_after_ms != new.scheduler.reserve_after_ms {
            applied.push("scheduling.reserve_after".into());
        }
        if old.auth_token != new.auth_token {
            applied.push("auth".into());
        }
        if old.allowed_roots != new.allowed_roots {
            applied.push("allowed_roots".into());
        }
        if format!("{:?}", old.workflows) != format!("{:?}", new.workflows) {
            applied.push("workflows".into());
        }

        self.state.set_config(new.scheduler.clone());
        let new = Arc::new(new);
        self.config_hash = crate::store::content_hash(&new.source);
        self.config_text = Arc::from(new.source.as_str());
        self.shared.set(new.clone());
        self.config = new;
        tracing::info!(changes = ?applied, "configuration reloaded");
        Ok(applied)
    }
}
