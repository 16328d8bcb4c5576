//! Pipeline runs and step runs: creation, status changes derived from steps, heartbeats,
//! purges.

use super::*;

/// A new pipeline: runs are counted from 1 as they are created.
pub(super) fn prepare_pipeline(description: String) -> Spec {
    Spec::Pipeline {
        description,
        run_count: 0,
    }
}

/// A new run: numbered by its pipeline, under a parent run of the same project (nesting
/// bounded), initializing, started now. `expected` is the number of steps it expects (0 =
/// unknown), carried in `step_counts[0]`.
pub(super) fn prepare_run(
    tx: &mut Tx<'_>,
    d: &Draft,
    pipeline: Id,
    orchestrator_run_id: String,
    parent_run: Id,
    expected: u32,
) -> R<Spec> {
    let mut run_index = 0;
    if pipeline != NIL {
        let mut p = tx.must_kind(&pipeline, Kind::Pipeline)?;
        if p.parent != d.parent {
            return invalid("the pipeline belongs to another project");
        }
        run_index = bump_counter(tx, &mut p, d.index, d.at_ms)?;
    }
    if parent_run != NIL {
        check_parent_run(tx, d, &parent_run)?;
    }
    let mut counts = [0u32; 9];
    counts[0] = expected;
    Ok(Spec::PipelineRun {
        pipeline,
        orchestrator_run_id,
        parent_run,
        status: RunStatus::Initializing,
        start_ms: d.at_ms,
        end_ms: 0,
        step_counts: counts,
        index: run_index,
    })
}

/// A parent run is another run of the same project, at most [`MAX_RUN_DEPTH`] deep.
fn check_parent_run(tx: &Tx<'_>, d: &Draft, parent_run: &Id) -> R<()> {
    if *parent_run == d.id {
        return invalid("a run cannot be its own parent");
    }
    let pr = tx.must_kind(parent_run, Kind::PipelineRun)?;
    if pr.parent != d.parent {
        return invalid("the parent run belongs to another project");
    }
    // Parents exist before children and never change, so the chain has no cycle; its depth is
    // still bounded.
    let mut depth = 1;
    let mut cur = pr;
    while let Spec::PipelineRun { parent_run: up, .. } = &cur.spec {
        if *up == NIL {
            break;
        }
        depth += 1;
        if depth >= MAX_RUN_DEPTH {
            return invalid(format!("parent runs nest deeper than {MAX_RUN_DEPTH}"));
        }
        match tx.load(up)? {
            Some(r) => cur = r,
            None => break,
        }
    }
    Ok(())
}

/// A new step: only in an unfinished run, initializing, counted into its run; a cache key is
/// indexed under the step's project.
pub(super) fn prepare_step(tx: &mut Tx<'_>, d: &Draft, attempt: u32, cache_key: String) -> R<Spec> {
    let run = tx.must_kind(&d.parent, Kind::PipelineRun)?;
    if let Spec::PipelineRun { status, .. } = &run.spec {
        if status.is_finished() {
            return refuse(
                MetaErrorKind::FailedPrecondition,
                format!(
                    "run {} is {}: it takes no new steps",
                    fmt_id(&d.parent),
                    status.name()
                ),
            );
        }
    }
    let step = Spec::StepRun {
        attempt,
        cache_key: cache_key.clone(),
        status: RunStatus::Initializing,
        heartbeat_ms: d.at_ms,
        start_ms: 0,
        end_ms: 0,
    };
    adjust_run(
        tx,
        d.index,
        d.at_ms,
        run,
        None,
        Some(RunStatus::Initializing),
        false,
    )?;
    if !cache_key.is_empty() {
        tx.put(
            keys::meta_cache(&d.ancestors.get(2).copied().unwrap_or(NIL), &cache_key),
            d.id.to_vec(),
        );
    }
    Ok(step)
}

/// Counts a step's status change into its run and re-derives the run's status.
/// `from`/`to` = None means the step is being created / deleted.
pub(super) fn adjust_run(
    tx: &mut Tx<'_>,
    index: u64,
    at_ms: u64,
    run: Record,
    from: Option<RunStatus>,
    to: Option<RunStatus>,
    resume: bool,
) -> R<Record> {
    let old = run.clone();
    let mut run = run;
    if let Spec::PipelineRun {
        status,
        step_counts,
        end_ms,
        ..
    } = &mut run.spec
    {
        if let Some(f) = from {
            let c = &mut step_counts[f as usize];
            *c = c.saturating_sub(1);
        }
        if let Some(t) = to {
            step_counts[t as usize] = step_counts[t as usize].saturating_add(1);
        }
        let derived = derive_run_status(*status, step_counts, resume);
        if derived != *status {
            *status = derived;
            if derived.is_finished() {
                *end_ms = at_ms;
            } else {
                *end_ms = 0;
            }
        }
    }
    run.mod_revision = index;
    run.updated_ms = at_ms;
    tx.write_row(Some(&old), Some(&run))?;
    Ok(run)
}

/// A run's status from its steps: any failed step fails it; all expected steps finished
/// completes it (stopped if one stopped); any step started makes it running. A finished run
/// keeps its status unless resumed.
pub fn derive_run_status(current: RunStatus, counts: &[u32; 9], resume: bool) -> RunStatus {
    if current.is_finished() && !resume {
        return current;
    }
    let c = |s: RunStatus| counts[s as usize];
    let expected = counts[0];
    let finished: u32 = RunStatus::ALL
        .iter()
        .filter(|s| s.is_finished())
        .map(|s| c(*s))
        .sum();
    let total: u32 = RunStatus::ALL.iter().map(|s| c(*s)).sum();
    if c(RunStatus::Failed) > 0 {
        return RunStatus::Failed;
    }
    if expected > 0 && finished >= expected && finished == total {
        return if c(RunStatus::Stopped) > 0 {
            RunStatus::Stopped
        } else {
            RunStatus::Completed
        };
    }
    if c(RunStatus::Running) + c(RunStatus::Retrying) + finished > 0 {
        return RunStatus::Running;
    }
    if current.is_finished() {
        // Resumed with no step started yet.
        return RunStatus::Running;
    }
    current
}

pub(super) fn finished_refusal<T>(what: &str, id: &Id, status: RunStatus) -> R<T> {
    refuse(
        MetaErrorKind::FailedPrecondition,
        format!(
            "{what} {} is {}: a finished {what} never changes status (resume it explicitly)",
            fmt_id(id),
            status.name()
        ),
    )
}

/// Whether a step or run may move `from -> to`: a finished one only through `resume` (to an
/// unfinished status), an unfinished one as [`RunStatus::can_move_to`] allows.
pub(super) fn check_transition(
    what: &str,
    id: &Id,
    from: RunStatus,
    to: RunStatus,
    resume: bool,
) -> R<()> {
    if resume {
        if !from.is_finished() || to.is_finished() {
            return refuse(
                MetaErrorKind::FailedPrecondition,
                format!(
                    "resume moves a finished {what} to an unfinished status; {what} {} is {}",
                    fmt_id(id),
                    from.name()
                ),
            );
        }
    } else if from.is_finished() {
        return finished_refusal(what, id, from);
    } else if !from.can_move_to(to) {
        return refuse(
            MetaErrorKind::FailedPrecondition,
            format!(
                "{what} {} cannot move from {} to {}",
                fmt_id(id),
                from.name(),
                to.name()
            ),
        );
    }
    Ok(())
}

pub(super) fn set_step_status(
    tx: &mut Tx<'_>,
    index: u64,
    at_ms: u64,
    id: &Id,
    to: RunStatus,
    resume: bool,
) -> R<Record> {
    let old = tx.must_kind(id, Kind::StepRun)?;
    let Spec::StepRun { status: from, .. } = old.spec else {
        return invalid("not a step");
    };
    check_transition("step", id, from, to, resume)?;
    let run = tx.must_kind(&old.parent, Kind::PipelineRun)?;
    if let Spec::PipelineRun { status, .. } = &run.spec {
        if status.is_finished() && !resume {
            return finished_refusal("run", &run.id, *status);
        }
    }
    let mut new = old.clone();
    if let Spec::StepRun {
        status,
        start_ms,
        end_ms,
        heartbeat_ms,
        ..
    } = &mut new.spec
    {
        *status = to;
        if matches!(to, RunStatus::Running) && *start_ms == 0 {
            *start_ms = at_ms;
        }
        *end_ms = if to.is_finished() { at_ms } else { 0 };
        *heartbeat_ms = at_ms;
    }
    new.mod_revision = index;
    new.updated_ms = at_ms;
    tx.write_row(Some(&old), Some(&new))?;
    if from != to {
        adjust_run(tx, index, at_ms, run, Some(from), Some(to), resume)?;
    }
    Ok(new)
}

pub(super) fn set_run_status(
    tx: &mut Tx<'_>,
    index: u64,
    at_ms: u64,
    id: &Id,
    to: RunStatus,
    resume: bool,
) -> R<Record> {
    let old = tx.must_kind(id, Kind::PipelineRun)?;
    let Spec::PipelineRun { status: from, .. } = old.spec else {
        return invalid("not a run");
    };
    check_transition("run", id, from, to, resume)?;
    let mut new = old.clone();
    if let Spec::PipelineRun { status, end_ms, .. } = &mut new.spec {
        *status = to;
        *end_ms = if to.is_finished() { at_ms } else { 0 };
    }
    new.mod_revision = index;
    new.updated_ms = at_ms;
    tx.write_row(Some(&old), Some(&new))?;
    Ok(new)
}

pub(super) fn heartbeat(tx: &mut Tx<'_>, index: u64, at_ms: u64, id: &Id) -> R<Record> {
    let old = tx.must_kind(id, Kind::StepRun)?;
    let mut new = old.clone();
    if let Spec::StepRun {
        status,
        heartbeat_ms,
        ..
    } = &mut new.spec
    {
        if status.is_finished() {
            return finished_refusal("step", id, *status);
        }
        *heartbeat_ms = at_ms;
    }
    new.mod_revision = index;
    new.updated_ms = at_ms;
    tx.write_row(Some(&old), Some(&new))?;
    Ok(new)
}

pub(super) fn purge_runs(
    tx: &mut Tx<'_>,
    index: u64,
    at_ms: u64,
    project: &Id,
    before_ms: u64,
    limit: u32,
) -> R<MetaResponse> {
    tx.must_kind(project, Kind::Project)?;
    if limit == 0 || limit > 1000 {
        return invalid("purge limit must be 1..=1000");
    }
    let prefix = keys::meta_index_prefix(
        index::IX_CHILDREN,
        &[&project[..], &[Kind::PipelineRun as u8]].concat(),
    );
    // Created before `before_ms` = sort key above sort_key(before_ms).
    let start = keys::meta_index(
        &prefix,
        index::sort_key(before_ms).saturating_add(1),
        0,
        &NIL,
    );
    let end = keys::prefix_end(&prefix).unwrap_or_default();
    let rows = tx.scan(&start, &end, limit as usize + 1)?;
    let more = rows.len() > limit as usize;
    let mut runs = 0u64;
    let mut removed = 0u64;
    for (k, _) in rows.into_iter().take(limit as usize) {
        let mut id = [0u8; 16];
        id.copy_from_slice(&k[k.len() - 16..]);
        if tx.load(&id)?.is_some() {
            removed += delete(tx, index, at_ms, &id, None)?;
            runs += 1;
        }
    }
    Ok(MetaResponse::Purged {
        removed,
        runs,
        more,
    })
}
