//! The report: a Markdown table with a column per target and, for two targets, a column of
//! the first's ratio to the second. Each scenario module writes its own rows through
//! [`Table::row`]; the benchmark's root fixes their order. This module imports no scenario.

use std::time::Duration;

use super::Figures;

/// A duration as milliseconds with two decimals.
pub(super) fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn ratio(baton: f64, peer: f64) -> String {
    if peer > 0.0 {
        format!("{:.1}x", baton / peer)
    } else {
        "-".into()
    }
}

/// The table being written.
pub(super) struct Table<'a> {
    results: &'a [Figures],
    with_ratio: bool,
    out: String,
}

impl Table<'_> {
    /// A row: `cell` gives a target's text and the value its ratio is computed from (`None`:
    /// not measured on that target). A row that no target has is left out.
    pub(super) fn row(
        &mut self,
        label: &str,
        cell: &dyn Fn(&Figures) -> Option<(String, f64)>,
        higher_is_better: bool,
    ) {
        let cells: Vec<Option<(String, f64)>> = self.results.iter().map(cell).collect();
        if cells.iter().all(Option::is_none) {
            return;
        }
        let text = cells
            .iter()
            .map(|c| c.as_ref().map_or("-".to_string(), |c| c.0.clone()))
            .collect::<Vec<_>>()
            .join(" | ");
        let ratio_cell = match (self.with_ratio, &cells[..]) {
            (true, [Some(b), Some(p)]) => {
                let r = if higher_is_better {
                    ratio(b.1, p.1)
                } else {
                    ratio(p.1, b.1)
                };
                format!(" {r} |")
            }
            (true, _) => " - |".to_string(),
            (false, _) => String::new(),
        };
        self.out
            .push_str(&format!("| {label} | {text} |{ratio_cell}\n"));
    }
}

impl<'a> Table<'a> {
    /// The table's header, one column per target; with exactly two targets and a `ratio`
    /// header, a column of the first's ratio to the second.
    pub(super) fn new(results: &'a [Figures], ratio_header: Option<&str>) -> Self {
        let mut out = String::new();
        let header = results
            .iter()
            .map(|f| f.name.as_str())
            .collect::<Vec<_>>()
            .join(" | ");
        let ratio_header = ratio_header.filter(|_| results.len() == 2);
        let with_ratio = ratio_header.is_some();
        out.push_str(&format!(
            "| figure | {header} |{}\n|---|{}{}\n",
            ratio_header.map_or(String::new(), |h| format!(" {h} |")),
            "---|".repeat(results.len()),
            if with_ratio { "---|" } else { "" }
        ));
        Self {
            results,
            with_ratio,
            out,
        }
    }

    /// The Markdown text.
    pub(super) fn finish(self) -> String {
        self.out
    }
}
