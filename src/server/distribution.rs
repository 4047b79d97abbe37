//! Distribution models: how a testrun becomes tasks (OTS allocator).

use crate::protocol::Distribution;

/// The package lists of the tasks a testrun is split into, in order.
pub fn split(distribution: Distribution, packages: &[String]) -> Vec<Vec<String>> {
    match distribution {
        Distribution::Default => vec![packages.to_vec()],
        Distribution::Perpackage => packages.iter().map(|p| vec![p.clone()]).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkgs(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("p{i}")).collect()
    }

    #[test]
    fn default_is_one_task_with_every_package() {
        assert_eq!(split(Distribution::Default, &pkgs(3)), vec![pkgs(3)]);
    }

    #[test]
    fn perpackage_is_one_task_per_package_in_order() {
        let tasks = split(Distribution::Perpackage, &pkgs(6));
        assert_eq!(tasks.len(), 6);
        assert_eq!(tasks[5], vec!["p6".to_string()]);
    }
}
