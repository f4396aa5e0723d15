//! The report of `all`: a list of named figures, each with one sample per run, printed as
//! tables of median (min–max) and written as JSON. A new figure is one more
//! [`Report::record`] call: its section, row and column appear in the order first recorded.

use serde_json::{Value, json};

/// One figure: a cell of a section's table, with its samples (one per run).
#[derive(Debug, Clone)]
pub struct Figure {
    pub section: String,
    /// The table row, e.g. "contact upsert, 8 clients".
    pub row: String,
    /// The table column, with its unit, e.g. "ops/s" or "p99 ms".
    pub column: String,
    pub samples: Vec<f64>,
}

impl Figure {
    pub fn median(&self) -> f64 {
        let mut s = self.samples.clone();
        s.sort_by(f64::total_cmp);
        match s.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => s[n / 2],
            n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
        }
    }

    pub fn min(&self) -> f64 {
        self.samples.iter().copied().fold(f64::NAN, f64::min)
    }

    pub fn max(&self) -> f64 {
        self.samples.iter().copied().fold(f64::NAN, f64::max)
    }

    fn cell(&self) -> String {
        if self.samples.len() <= 1 {
            number(self.median())
        } else {
            format!(
                "{} ({}–{})",
                number(self.median()),
                number(self.min()),
                number(self.max())
            )
        }
    }
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "—".to_string()
    } else if v.abs() >= 100.0 || (v.fract() == 0.0 && v.abs() < 1e15) {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[derive(Debug, Default)]
pub struct Report {
    figures: Vec<Figure>,
    /// (section, text): printed under the section's table.
    notes: Vec<(String, String)>,
}

impl Report {
    /// Adds one run's value of a figure.
    pub fn record(&mut self, section: &str, row: &str, column: &str, value: f64) {
        match self
            .figures
            .iter_mut()
            .find(|f| f.section == section && f.row == row && f.column == column)
        {
            Some(f) => f.samples.push(value),
            None => self.figures.push(Figure {
                section: section.to_string(),
                row: row.to_string(),
                column: column.to_string(),
                samples: vec![value],
            }),
        }
    }

    /// A line under a section's table (recorded once, however many runs).
    pub fn note(&mut self, section: &str, text: &str) {
        let note = (section.to_string(), text.to_string());
        if !self.notes.contains(&note) {
            self.notes.push(note);
        }
    }

    fn sections(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for f in &self.figures {
            if !out.contains(&f.section.as_str()) {
                out.push(&f.section);
            }
        }
        out
    }

    /// Markdown: per section, a table of rows × columns, each cell "median (min–max)".
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        for section in self.sections() {
            let figures: Vec<&Figure> = self
                .figures
                .iter()
                .filter(|f| f.section == section)
                .collect();
            let mut rows: Vec<&str> = Vec::new();
            let mut columns: Vec<&str> = Vec::new();
            for f in &figures {
                if !rows.contains(&f.row.as_str()) {
                    rows.push(&f.row);
                }
                if !columns.contains(&f.column.as_str()) {
                    columns.push(&f.column);
                }
            }
            out.push_str(&format!(
                "### {section}\n\n|  | {} |\n",
                columns.join(" | ")
            ));
            out.push_str(&format!("|---|{}\n", "---|".repeat(columns.len())));
            for row in rows {
                let cells: Vec<String> = columns
                    .iter()
                    .map(|column| {
                        figures
                            .iter()
                            .find(|f| f.row == row && f.column == *column)
                            .map_or_else(|| "".to_string(), |f| f.cell())
                    })
                    .collect();
                out.push_str(&format!("| {row} | {} |\n", cells.join(" | ")));
            }
            for (_, text) in self.notes.iter().filter(|(s, _)| s == section) {
                out.push_str(&format!("\n{text}\n"));
            }
            out.push('\n');
        }
        out
    }

    /// Every figure with its median, min, max and samples, under `about`.
    pub fn to_json(&self, about: Value) -> Value {
        let figures: Vec<Value> = self
            .figures
            .iter()
            .map(|f| {
                json!({
                    "section": f.section,
                    "row": f.row,
                    "column": f.column,
                    "median": finite(f.median()),
                    "min": finite(f.min()),
                    "max": finite(f.max()),
                    "samples": f.samples.iter().map(|v| finite(*v)).collect::<Vec<_>>(),
                })
            })
            .collect();
        let notes: Vec<Value> = self
            .notes
            .iter()
            .map(|(section, text)| json!({"section": section, "text": text}))
            .collect();
        json!({"about": about, "figures": figures, "notes": notes})
    }
}

/// JSON has no NaN or infinity: those become null.
fn finite(v: f64) -> Value {
    if v.is_finite() { json!(v) } else { Value::Null }
}
