//! The binaries' shell completions and man pages, generated from their clap
//! definitions: each binary parses its command line with [`parse`], which
//! also answers two hidden subcommands that `packaging/build-debs.sh` runs
//! to put them in the packages, `completions SHELL` (the script on stdout)
//! and `man DIR` (a page per command and subcommand: `NAME.1`,
//! `NAME-SUB.1`, ...). Both are added for parsing only, so neither the
//! completions nor the pages offer them, and `--help` does not show them.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

use clap::{Arg, Command, Parser};

pub use clap_complete::Shell;

const COMPLETIONS: &str = "completions";
const MAN: &str = "man";
/// The manual the pages belong to (the centre of the page footer).
const MANUAL: &str = "Deployment Engine";

/// One man page: its file name (`dectl-nodes.1`) and its roff text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManPage {
    pub file_name: String,
    pub roff: Vec<u8>,
}

/// What a command line asks for.
#[derive(Debug)]
enum Invocation<C> {
    Run(C),
    Completions(Shell),
    Man(PathBuf),
}

/// Parses the process's arguments into `C` as `C::parse()` does (printing
/// help, the version or the error and exiting where that does); for
/// `completions SHELL` or `man DIR` it writes the script or the pages
/// instead and exits, with status 1 if they could not be written.
pub fn parse<C: Parser>() -> C {
    let invocation = invocation::<C, _, _>(std::env::args_os()).unwrap_or_else(|e| e.exit());
    let name = C::command().get_name().to_owned();
    let written = match invocation {
        Invocation::Run(cli) => return cli,
        Invocation::Completions(shell) => {
            let mut out = std::io::stdout().lock();
            out.write_all(&completions(C::command(), shell))
                .and_then(|()| out.flush())
                .map_err(|e| format!("cannot write the {shell} completions: {e}"))
        }
        Invocation::Man(dir) => write_man_pages(C::command(), &dir),
    };
    match written {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("{name}: {e}");
            std::process::exit(1)
        }
    }
}

/// The arguments as `C`, or a request for completions or man pages.
fn invocation<C, I, T>(args: I) -> Result<Invocation<C>, clap::Error>
where
    C: Parser,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cmd = C::command()
        .subcommand(
            Command::new(COMPLETIONS)
                .hide(true)
                .about("Print the shell completion script")
                .arg(
                    Arg::new("shell")
                        .required(true)
                        .value_parser(clap::value_parser!(Shell)),
                ),
        )
        .subcommand(
            Command::new(MAN)
                .hide(true)
                .about("Write the man pages into DIR (created if missing)")
                .arg(
                    Arg::new("dir")
                        .required(true)
                        .value_parser(clap::value_parser!(PathBuf)),
                ),
        );
    let mut matches = cmd.try_get_matches_from(args)?;
    match matches.subcommand() {
        Some((COMPLETIONS, m)) => {
            if let Some(shell) = m.get_one::<Shell>("shell") {
                return Ok(Invocation::Completions(*shell));
            }
        }
        Some((MAN, m)) => {
            if let Some(dir) = m.get_one::<PathBuf>("dir") {
                return Ok(Invocation::Man(dir.clone()));
            }
        }
        _ => {}
    }
    C::from_arg_matches_mut(&mut matches)
        .map(Invocation::Run)
        .map_err(|e| e.format(&mut C::command()))
}

/// The completion script of `cmd` for `shell`.
pub fn completions(mut cmd: Command, shell: Shell) -> Vec<u8> {
    let name = cmd.get_name().to_owned();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut out);
    out
}

/// The man pages of `cmd`: its own, then one per subcommand, at every depth
/// (hidden ones and `help` left out), each listing its options.
pub fn man_pages(cmd: Command) -> Vec<ManPage> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let source = format!(
        "{} {}",
        cmd.get_name(),
        cmd.get_version().unwrap_or_default()
    );
    let mut pages = Vec::new();
    add_pages(&cmd, &source, &mut pages);
    pages
}

fn add_pages(cmd: &Command, source: &str, pages: &mut Vec<ManPage>) {
    let man = clap_mangen::Man::new(cmd.clone())
        .source(source)
        .manual(MANUAL);
    let mut roff = Vec::new();
    // Into memory: only a full Vec could fail, and then the page is empty,
    // which the binaries' tests would see.
    let _ = man.render(&mut roff);
    pages.push(ManPage {
        file_name: man.get_filename(),
        roff,
    });
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        add_pages(sub, source, pages);
    }
}

fn write_man_pages(cmd: Command, dir: &std::path::Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    for page in man_pages(cmd) {
        let path = dir.join(&page.file_name);
        std::fs::write(&path, &page.roff)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Subcommand};

    #[derive(Parser, Debug, PartialEq)]
    #[command(name = "toy", version, about = "A toy")]
    struct Toy {
        #[arg(long, global = true)]
        verbose: bool,
        #[command(subcommand)]
        command: ToyCommand,
    }

    #[derive(Subcommand, Debug, PartialEq)]
    enum ToyCommand {
        /// Say hello.
        Greet {
            #[arg(long)]
            loudly: bool,
        },
        /// Things in the box.
        Things {
            #[command(subcommand)]
            what: Things,
        },
        #[command(hide = true)]
        Secret,
    }

    #[derive(Subcommand, Debug, PartialEq)]
    enum Things {
        /// List them.
        List,
    }

    fn args(line: &str) -> Result<Invocation<Toy>, clap::Error> {
        invocation::<Toy, _, _>(line.split_whitespace())
    }

    #[test]
    fn the_command_line_parses_as_before_and_the_generators_are_recognised() {
        assert!(matches!(
            args("toy greet --loudly"),
            Ok(Invocation::Run(Toy {
                command: ToyCommand::Greet { loudly: true },
                ..
            }))
        ));
        assert!(matches!(
            args("toy completions bash"),
            Ok(Invocation::Completions(Shell::Bash))
        ));
        assert!(
            matches!(args("toy man out"), Ok(Invocation::Man(d)) if d == std::path::Path::new("out"))
        );
        assert!(args("toy completions tcsh").is_err());
        assert!(args("toy man").is_err());
        // An error is worded against the binary's own command line.
        let e = args("toy greet --softly").expect_err("unknown flag");
        assert!(e.to_string().contains("--softly"), "{e}");
        let help = Toy::command().render_long_help().to_string();
        assert!(
            !help.contains(COMPLETIONS) && !help.contains("  man "),
            "{help}"
        );
    }

    #[test]
    fn completions_offer_every_subcommand_but_not_the_generators() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let text = String::from_utf8(completions(Toy::command(), shell)).expect("utf-8");
            // fish names a long option without its dashes (`-l loudly`).
            for word in ["greet", "loudly", "things", "list", "verbose"] {
                assert!(text.contains(word), "{shell}: no {word} in\n{text}");
            }
            assert!(!text.contains("completions"), "{shell}: {text}");
        }
    }

    #[test]
    fn a_man_page_per_visible_subcommand_each_with_its_name_section() {
        let pages = man_pages(Toy::command());
        let names: Vec<&str> = pages.iter().map(|p| p.file_name.as_str()).collect();
        assert_eq!(
            names,
            ["toy.1", "toy-greet.1", "toy-things.1", "toy-things-list.1"]
        );
        let page = |name: &str| {
            pages
                .iter()
                .find(|p| p.file_name == name)
                .map(|p| String::from_utf8_lossy(&p.roff).into_owned())
                .unwrap_or_default()
        };
        let top = page("toy.1");
        assert!(top.contains("\n.TH toy 1"), "{top}");
        assert!(
            top.contains(".SH NAME") && top.contains("toy\\-greet(1)"),
            "{top}"
        );
        assert!(top.contains("toy 0.") && top.contains(MANUAL), "{top}");
        assert!(!top.contains("secret"), "{top}");
        assert!(page("toy-greet.1").contains("\\-\\-loudly"));
    }
}
