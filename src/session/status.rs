//! The status sets the stores select by, as SQL list literals.
//!
//! A store never writes a status list by hand: it writes `status_sql!(active)` (a literal,
//! so it fits in `concat!` and a prepared statement stays one string). The test below holds
//! each set to the predicates of [`Status`](crate::model::Status), so the rules and the SQL
//! mean the same thing by "active", "open" and "final".

/// A status set as an SQL list, e.g. `status IN status_sql!(active)`:
///
/// - `active`: `running` or `waiting`, the one slot of a session (I1);
/// - `open`: not final (`queued`, `running`, `waiting`): what retention must keep whole;
/// - `final`: `completed`, `failed`, `cancelled`: nothing changes after them;
/// - `queued`, `running`, `waiting`, `completed`: that status alone.
#[macro_export]
macro_rules! status_sql {
    (active) => {
        "('running', 'waiting')"
    };
    (open) => {
        "('queued', 'running', 'waiting')"
    };
    (final) => {
        "('completed', 'failed', 'cancelled')"
    };
    (queued) => {
        "('queued')"
    };
    (running) => {
        "('running')"
    };
    (waiting) => {
        "('waiting')"
    };
    (completed) => {
        "('completed')"
    };
}

#[cfg(test)]
mod tests {
    use crate::model::Status;

    const ALL: [Status; 6] = [
        Status::Queued,
        Status::Running,
        Status::Waiting,
        Status::Completed,
        Status::Failed,
        Status::Cancelled,
    ];

    fn members(list: &str) -> Vec<Status> {
        list.trim_matches(|c| c == '(' || c == ')')
            .split(',')
            .map(|s| s.trim().trim_matches('\'').parse().expect("a status"))
            .collect()
    }

    fn check(list: &str, predicate: impl Fn(Status) -> bool) {
        let expected: Vec<Status> = ALL.into_iter().filter(|s| predicate(*s)).collect();
        assert_eq!(members(list), expected, "{list}");
    }

    #[test]
    fn each_set_is_its_predicate() {
        check(status_sql!(active), Status::is_active);
        check(status_sql!(open), |s| !s.is_final());
        check(status_sql!(final), Status::is_final);
        check(status_sql!(queued), |s| s == Status::Queued);
        check(status_sql!(running), |s| s == Status::Running);
        check(status_sql!(waiting), |s| s == Status::Waiting);
        check(status_sql!(completed), |s| s == Status::Completed);
    }
}
