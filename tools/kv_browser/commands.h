// kv-browser's front-end glue: text renderers for the query documents, the
// maintenance commands (the only ones that write) and the terminal UI.
#ifndef CKPTKV_TOOLS_KV_BROWSER_COMMANDS_H_
#define CKPTKV_TOOLS_KV_BROWSER_COMMANDS_H_

#include <functional>
#include <string>
#include <vector>

#include "tools/kv_browser/analysis.h"

namespace ckptkv::kvb {

// Prints "error: ..." to stderr and returns the exit code of the status.
int ReportError(const Status& s);
// Prints the document as JSON or through `text`; returns 0, or the error's
// exit code.
int Emit(const Result<json>& r, bool as_json, const std::function<void(const json&)>& text);

void RenderTags(const json& j);
void RenderTree(const json& j, bool expand);
void RenderShow(const json& j);
void RenderStats(const json& j);
void RenderHist(const json& j);
void RenderPeek(const json& j);
void RenderDiff(const json& j);
void RenderHistory(const json& j);
void RenderMeta(const json& j);
void RenderDu(const json& j);
void RenderVerify(const json& j);
void RenderExport(const json& j);
// A text histogram, `width` columns for the longest bar.
std::vector<std::string> HistogramLines(const json& hist, int width);
// Nested, numpy-like text of a peek document's values.
std::string PeekText(const json& peek);

struct WriteFlags {
  bool dry_run = false;
  bool yes = false;     // write without asking
  bool run_gc = false;  // rm / keep: gc afterwards
  bool as_json = false;
};
int RunGc(const std::string& db, const WriteFlags& f);
int RunRm(const std::string& db, const std::vector<std::string>& tags, const WriteFlags& f);
int RunKeep(const std::string& db, int last, int every, const WriteFlags& f);

int RunTui(const std::string& db);

// Parses the command line and runs one subcommand; returns the exit code.
int RunCli(int argc, char** argv);

}  // namespace ckptkv::kvb

#endif  // CKPTKV_TOOLS_KV_BROWSER_COMMANDS_H_
