// Text renderers of the query documents (the JSON documents are printed as
// they are with --json), shared by kv-browser's CLI and terminal UI and by
// ckptkv's admin commands (admin.h).
#ifndef CKPTKV_TOOLS_KV_BROWSER_COMMANDS_H_
#define CKPTKV_TOOLS_KV_BROWSER_COMMANDS_H_

#include <functional>
#include <string>
#include <vector>

#include "tools/kv_browser/analysis.h"

namespace ckptkv::kvb {

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

}  // namespace ckptkv::kvb

#endif  // CKPTKV_TOOLS_KV_BROWSER_COMMANDS_H_
