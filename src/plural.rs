//! Counted nouns for log lines: "1 running job", "2 running jobs" (every noun counted in
//! a log line has a regular plural). A leaf.

/// `n` and the noun, singular for one.
pub fn count(n: usize, singular: &str) -> String {
    match n {
        1 => format!("1 {singular}"),
        n => format!("{n} {singular}s"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_is_singular() {
        assert_eq!(super::count(1, "running job"), "1 running job");
        assert_eq!(super::count(0, "early cancel"), "0 early cancels");
        assert_eq!(super::count(2, "remembered worker"), "2 remembered workers");
    }
}
