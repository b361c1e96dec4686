//! Checks a job before anything runs: every field that reaches a command line must be
//! impossible to read as an option, and paths must stay inside the checkout.

use std::path::{Component, Path, PathBuf};

use crate::job::MAX_JOB_ID_LEN;
use crate::proto::job::JobRequest;

/// A job whose fields passed the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedJob {
    /// What `git clone` clones: a URL or a local path; `None` when the job has no repository.
    pub source: Option<String>,
    /// Branch to check out (empty: the remote's default branch).
    pub branch: String,
    /// Build context, relative to the checkout (`.` when empty).
    pub context_dir: PathBuf,
    /// Dockerfile, relative to the context (`Dockerfile` when empty).
    pub dockerfile: PathBuf,
    /// Image reference to build (may be empty for the exec executor).
    pub image_name: String,
}

/// Checks a jobId before a slot is taken for it: it names a thread, a workspace and log
/// lines, so it is 1 to 255 bytes with no control character.
pub fn job_id(id: &str) -> Result<(), String> {
    if id.trim().is_empty() {
        Err("jobId is empty".to_string())
    } else if id.len() > MAX_JOB_ID_LEN {
        Err(format!("jobId is longer than {MAX_JOB_ID_LEN} bytes"))
    } else if id.chars().any(char::is_control) {
        Err("jobId contains control characters".to_string())
    } else {
        Ok(())
    }
}

/// Where a worker may clone from.
#[derive(Debug, Clone, Copy)]
pub struct Sources<'a> {
    /// Turns `owner/name` into a clone URL.
    pub git_base_url: &'a str,
    /// Local paths and `file://` URLs too (`--allow-local-repos`): off by default, as
    /// a job could otherwise read any repository on the worker's disk.
    pub allow_local: bool,
}

/// Checks `job` against what this worker accepts.
pub fn check(job: &JobRequest, sources: Sources) -> Result<CheckedJob, String> {
    job_id(&job.jobId)?;
    let branch = job.branch.trim();
    if !branch.is_empty() && !is_valid_branch(branch) {
        return Err("branch is not a valid git branch name".to_string());
    }
    let image_name = job.imageName.trim();
    if !image_name.is_empty() && !is_valid_image_reference(image_name) {
        return Err("imageName is not a valid image reference (lowercase name[:tag])".to_string());
    }
    Ok(CheckedJob {
        source: clone_source(job.repoUrl.trim(), sources)?,
        branch: branch.to_string(),
        context_dir: relative_inside("contextDir", &job.contextDir, ".")?,
        dockerfile: relative_inside("dockerfilePath", &job.dockerfilePath, "Dockerfile")?,
        image_name: image_name.to_string(),
    })
}

/// `owner/name` → `<base>/owner/name.git`; URLs and absolute paths as they are.
fn clone_source(repo: &str, sources: Sources) -> Result<Option<String>, String> {
    if repo.is_empty() {
        return Ok(None);
    }
    if repo.starts_with('-') || repo.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("repoUrl is not a repository URL, path or owner/name".to_string());
    }
    let is_name = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    let source = match repo.split_once('/') {
        Some((owner, name)) if is_name(owner) && is_name(name) && !repo.contains("://") => {
            let name = name.strip_suffix(".git").unwrap_or(name);
            format!(
                "{}/{owner}/{name}.git",
                sources.git_base_url.trim_end_matches('/')
            )
        }
        _ if repo.starts_with('/') || repo.starts_with("file://") => {
            if !sources.allow_local {
                return Err("repoUrl is a local path or file:// URL, which this worker \
                            refuses (--allow-local-repos allows them)"
                    .to_string());
            }
            repo.to_string()
        }
        _ if ["https://", "http://", "ssh://", "git://"]
            .iter()
            .any(|s| repo.starts_with(s)) =>
        {
            repo.to_string()
        }
        _ => return Err("repoUrl is not a repository URL, path or owner/name".to_string()),
    };
    Ok(Some(source))
}

/// A relative path with no `..` and no root; `default` when empty.
fn relative_inside(field: &str, value: &str, default: &str) -> Result<PathBuf, String> {
    let value = if value.trim().is_empty() {
        default
    } else {
        value
    };
    let path = Path::new(value);
    let mut clean = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(format!("{field} must stay inside the repository"));
            }
        }
    }
    if value.starts_with('-') || value.chars().any(char::is_control) {
        return Err(format!("{field} is not a usable path"));
    }
    Ok(if clean.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        clean
    })
}

/// Git's branch-name rules (`git check-ref-format --branch`), minus the exotic ones.
fn is_valid_branch(branch: &str) -> bool {
    !branch.starts_with('-')
        && !branch.starts_with('/')
        && !branch.ends_with('/')
        && !branch.ends_with('.')
        && !branch.ends_with(".lock")
        && !branch.contains("..")
        && !branch.contains("//")
        && !branch.contains("@{")
        && branch
            .chars()
            .all(|c| !c.is_control() && !c.is_whitespace() && !"~^:?*[\\".contains(c))
}

/// Docker's reference grammar: `[host[:port]/]path[:tag]`, lowercase path components.
fn is_valid_image_reference(reference: &str) -> bool {
    let (name, tag) = match reference.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name, Some(tag)),
        _ => (reference, None),
    };
    let tag_ok = tag.is_none_or(|t| {
        !t.is_empty()
            && t.len() <= 128
            && !t.starts_with(['.', '-'])
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    });
    let mut parts: Vec<&str> = name.split('/').collect();
    let host_ok = if parts.len() > 1 && (parts[0].contains(['.', ':']) || parts[0] == "localhost") {
        let host = parts.remove(0);
        host.chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-:".contains(c))
    } else {
        true
    };
    let component_ok = |p: &&str| {
        !p.is_empty()
            && p.chars()
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            && p.chars()
                .last()
                .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            && p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
    };
    !reference.starts_with('-')
        && tag_ok
        && host_ok
        && !parts.is_empty()
        && parts.iter().all(component_ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strict(git_base_url: &str) -> Sources<'_> {
        Sources {
            git_base_url,
            allow_local: false,
        }
    }

    fn job(repo: &str, branch: &str, context: &str, dockerfile: &str, image: &str) -> JobRequest {
        JobRequest {
            jobId: "j".into(),
            repoUrl: repo.into(),
            branch: branch.into(),
            contextDir: context.into(),
            dockerfilePath: dockerfile.into(),
            imageName: image.into(),
            ..JobRequest::default()
        }
    }

    #[test]
    fn good_jobs_pass_and_owner_name_becomes_a_url() {
        let checked = check(
            &job(
                "acme/app",
                "feature/x",
                "svc/api",
                "docker/Dockerfile",
                "acme/app:1.2",
            ),
            strict("https://git.example"),
        )
        .unwrap();
        assert_eq!(
            checked.source.as_deref(),
            Some("https://git.example/acme/app.git")
        );
        assert_eq!(checked.context_dir, PathBuf::from("svc/api"));
        assert_eq!(checked.dockerfile, PathBuf::from("docker/Dockerfile"));
        let local = Sources {
            git_base_url: "x",
            allow_local: true,
        };
        let checked = check(
            &job("/srv/repos/app", "", "", "", "127.0.0.1:5000/app"),
            local,
        )
        .unwrap();
        assert_eq!(checked.source.as_deref(), Some("/srv/repos/app"));
        assert_eq!(checked.context_dir, PathBuf::from("."));
        assert_eq!(checked.dockerfile, PathBuf::from("Dockerfile"));
        assert!(check(&job("file:///tmp/r", "main", "./a/./b", "", ""), local).is_ok());
        for repo in ["/srv/repos/app", "file:///tmp/r"] {
            let err = check(&job(repo, "", "", "", ""), strict("x")).unwrap_err();
            assert!(err.contains("--allow-local-repos"), "{err}");
        }
    }

    #[test]
    fn escaping_paths_options_and_bad_references_are_refused() {
        let base = "https://github.com";
        let refused = |j: JobRequest, field: &str| {
            let err = check(&j, strict(base)).unwrap_err();
            assert!(err.contains(field), "{err}");
        };
        refused(job("a/b", "main", "../outside", "", ""), "contextDir");
        refused(job("a/b", "main", "/etc", "", ""), "contextDir");
        refused(
            job("a/b", "main", ".", "../../Dockerfile", ""),
            "dockerfilePath",
        );
        refused(job("a/b", "--upload-pack=evil", ".", "", ""), "branch");
        refused(job("a/b", "a..b", ".", "", ""), "branch");
        refused(job("a/b", "main", ".", "", "--privileged"), "imageName");
        refused(job("a/b", "main", ".", "", "Acme/App"), "imageName");
        refused(job("a/b", "main", ".", "", "app:"), "imageName");
        refused(job("--config=x", "main", ".", "", ""), "repoUrl");
        refused(job("not a repo", "main", ".", "", ""), "repoUrl");
        let mut empty_id = job("a/b", "", "", "", "");
        empty_id.jobId = " ".into();
        refused(empty_id, "jobId");
    }
}
