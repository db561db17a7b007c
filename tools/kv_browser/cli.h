// kv-browser's command line (cli.cc): `kv-browser --db DIR SUBCOMMAND ...`.
#ifndef CKPTKV_TOOLS_KV_BROWSER_CLI_H_
#define CKPTKV_TOOLS_KV_BROWSER_CLI_H_

namespace ckptkv::kvb {

// Parses the command line and runs one subcommand; returns the exit code.
int RunCli(int argc, char** argv);

}  // namespace ckptkv::kvb

#endif  // CKPTKV_TOOLS_KV_BROWSER_CLI_H_
