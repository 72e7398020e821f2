//! Pipelines as the scheduler sees them: a DAG of stages with resource requests.

use crate::resources::ResourceRequest;
use crate::retry::RetryPolicy;

/// Position of a stage in its pipeline.
pub type StageIndex = usize;

#[derive(Clone, Debug, PartialEq)]
pub struct StageSpec {
    pub name: String,
    pub needs: ResourceRequest,
    /// Predecessors. Every one must succeed before this stage starts.
    pub after: Vec<StageIndex>,
    /// Wall-clock limit of one attempt.
    pub timeout_ms: Option<u64>,
    pub retry: RetryPolicy,
    /// Declared duration of one attempt, for the queue's critical-path order (see `order`).
    pub expected_ms: Option<u64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Pipeline {
    pub name: String,
    pub stages: Vec<StageSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PipelineError {
    #[error("pipeline has no stages")]
    Empty,
    #[error("stage {stage} lists predecessor #{after}, which does not exist")]
    UnknownPredecessor { stage: StageIndex, after: StageIndex },
    #[error("stage {stage} depends on itself through `after` (a cycle)")]
    Cycle { stage: StageIndex },
}

impl Pipeline {
    /// Builds a pipeline, refusing empty ones, dangling edges and cycles.
    pub fn new(name: impl Into<String>, stages: Vec<StageSpec>) -> Result<Pipeline, PipelineError> {
        if stages.is_empty() {
            return Err(PipelineError::Empty);
        }
        for (i, stage) in stages.iter().enumerate() {
            if let Some(&after) = stage.after.iter().find(|a| **a >= stages.len()) {
                return Err(PipelineError::UnknownPredecessor { stage: i, after });
            }
        }
        // Kahn's algorithm: whatever is left unvisited sits on a cycle.
        let mut indegree: Vec<usize> = stages.iter().map(|s| s.after.len()).collect();
        let mut ready: Vec<usize> = (0..stages.len()).filter(|i| indegree[*i] == 0).collect();
        let mut visited = 0;
        while let Some(i) = ready.pop() {
            visited += 1;
            for (j, s) in stages.iter().enumerate() {
                for _ in s.after.iter().filter(|a| **a == i) {
                    indegree[j] -= 1;
                    if indegree[j] == 0 {
                        ready.push(j);
                    }
                }
            }
        }
        if visited < stages.len() {
            let stage = (0..stages.len()).find(|i| indegree[*i] > 0).unwrap_or(0);
            return Err(PipelineError::Cycle { stage });
        }
        Ok(Pipeline { name: name.into(), stages })
    }

    /// Stages that nothing depends on: their outputs make up the job's output.
    pub fn sinks(&self) -> Vec<StageIndex> {
        (0..self.stages.len()).filter(|i| !self.stages.iter().any(|s| s.after.contains(i))).collect()
    }

    /// Whether `ancestor` must finish before `stage` can start, directly or transitively.
    pub fn is_ancestor(&self, ancestor: StageIndex, stage: StageIndex) -> bool {
        let mut stack = self.stages[stage].after.clone();
        let mut seen = vec![false; self.stages.len()];
        while let Some(s) = stack.pop() {
            if s == ancestor {
                return true;
            }
            if !std::mem::replace(&mut seen[s], true) {
                stack.extend(self.stages[s].after.iter().copied());
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(name: &str, after: Vec<usize>) -> StageSpec {
        StageSpec {
            name: name.into(),
            needs: Default::default(),
            after,
            timeout_ms: None,
            retry: RetryPolicy::default(),
            expected_ms: None,
        }
    }

    #[test]
    fn cycles_and_dangling_edges_are_refused() {
        assert_eq!(
            Pipeline::new("p", vec![stage("a", vec![1]), stage("b", vec![0])]).unwrap_err(),
            PipelineError::Cycle { stage: 0 }
        );
        assert!(matches!(Pipeline::new("p", vec![stage("a", vec![3])]), Err(PipelineError::UnknownPredecessor { .. })));
        assert_eq!(Pipeline::new("p", vec![]).unwrap_err(), PipelineError::Empty);
    }

    #[test]
    fn ancestry_and_sinks() {
        let p =
            Pipeline::new("p", vec![stage("a", vec![]), stage("b", vec![0]), stage("c", vec![1]), stage("d", vec![0])])
                .unwrap();
        assert!(p.is_ancestor(0, 2));
        assert!(!p.is_ancestor(3, 2));
        assert_eq!(p.sinks(), vec![2, 3]);
    }
}
