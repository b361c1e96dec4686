//! The status page's small bar charts of the last hour, as numbers for inline SVG (no
//! script, no framework): one bar per minute, scaled to the tallest.

use crate::metrics::{Minute, MINUTES};

/// The drawing's height in SVG units; each bar is [`BAR_WIDTH`] wide.
pub const HEIGHT: u32 = 40;
/// A bar's width in SVG units.
pub const BAR_WIDTH: u32 = 5;

/// One minute's bar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bar {
    /// Left edge.
    pub x: u32,
    /// Top edge.
    pub y: u32,
    /// Height (0: nothing that minute).
    pub height: u32,
    /// The tooltip: how long ago, and the value.
    pub title: String,
}

/// A chart of one quantity over the last hour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chart {
    /// What it shows.
    pub title: &'static str,
    /// The tallest bar's value.
    pub max: u64,
    /// The values' unit (` jobs`, ` ms`).
    pub unit: &'static str,
    /// The sum over the hour (or, for waits, the mean of the minutes' means).
    pub summary: String,
    /// One bar per minute, oldest first.
    pub bars: Vec<Bar>,
}

impl Chart {
    /// The drawing's width in SVG units.
    pub fn width(&self) -> u32 {
        BAR_WIDTH * MINUTES as u32
    }

    /// The drawing's height in SVG units.
    pub fn height(&self) -> u32 {
        HEIGHT
    }

    fn of(title: &'static str, unit: &'static str, values: &[u64], summary: String) -> Chart {
        let max = values.iter().copied().max().unwrap_or(0);
        let bars = values
            .iter()
            .enumerate()
            .map(|(i, &value)| {
                let height = if max == 0 {
                    0
                } else {
                    // At least one unit for any value above zero.
                    ((value * u64::from(HEIGHT)).div_ceil(max)) as u32
                };
                let ago = values.len() - 1 - i;
                Bar {
                    x: i as u32 * BAR_WIDTH,
                    y: HEIGHT - height,
                    height,
                    title: format!("{ago} min ago: {value}{unit}"),
                }
            })
            .collect();
        Chart {
            title,
            max,
            unit,
            summary,
            bars,
        }
    }
}

/// The page's three charts: jobs received and finished per minute, and the mean wait
/// for a worker.
pub fn charts(hour: &[Minute]) -> Vec<Chart> {
    let received: Vec<u64> = hour.iter().map(|m| u64::from(m.received)).collect();
    let finished: Vec<u64> = hour.iter().map(|m| u64::from(m.finished)).collect();
    let waits: Vec<u64> = hour.iter().map(Minute::wait_ms_mean).collect();
    let waited: u64 = hour.iter().map(|m| u64::from(m.waited)).sum();
    let wait_sum: u64 = hour.iter().map(|m| m.wait_ms_sum).sum();
    let mean_wait = wait_sum.checked_div(waited).unwrap_or(0);
    vec![
        Chart::of(
            "received per minute",
            " jobs",
            &received,
            format!("{} in the hour", received.iter().sum::<u64>()),
        ),
        Chart::of(
            "finished per minute",
            " jobs",
            &finished,
            format!("{} in the hour", finished.iter().sum::<u64>()),
        ),
        Chart::of(
            "wait for a worker (mean)",
            " ms",
            &waits,
            format!("{mean_wait} ms mean over the hour"),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_scale_to_the_tallest_and_any_job_shows() {
        let mut hour = vec![Minute::default(); MINUTES];
        hour[MINUTES - 1].received = 100;
        hour[MINUTES - 2].received = 1;
        let chart = &charts(&hour)[0];
        assert_eq!(chart.bars.len(), MINUTES);
        let last = &chart.bars[MINUTES - 1];
        assert_eq!((last.y, last.height), (0, HEIGHT));
        assert_eq!(
            chart.bars[MINUTES - 2].height,
            1,
            "one job is not invisible"
        );
        assert_eq!(chart.bars[0].height, 0);
        assert_eq!(chart.summary, "101 in the hour");
        assert_eq!(last.title, "0 min ago: 100 jobs");
        assert_eq!(charts(&vec![Minute::default(); MINUTES])[1].max, 0);
    }
}
