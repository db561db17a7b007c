// meta: the non-tensor part of a saved state, rendered from the stored
// StateTree (a verified FlatBuffers record: nothing is unpickled or run).
#include <map>

#include "store/names.h"
#include "tools/kv_browser/analysis.h"

namespace ckptkv::kvb {

namespace {

constexpr int kMaxDepth = 200;

class TreeRenderer {
 public:
  TreeRenderer(const std::map<std::string, const TensorEntry*>& tensors, bool with_tensors)
      : tensors_(tensors), with_tensors_(with_tensors) {}

  uint64_t tensors_seen = 0;

  // The node as JSON; nullopt when it holds only tensors and they are left
  // out. Tensors become {"tensor": param, "dtype", "shape"}.
  std::optional<json> Render(const fb::Node* n, int depth) {
    if (n == nullptr) return json(nullptr);
    if (depth > kMaxDepth) return json("<nested too deep>");
    switch (n->kind()) {
      case fb::NodeKind::None:
        return json(nullptr);
      case fb::NodeKind::Bool:
        return json(n->b());
      case fb::NodeKind::Int:
        return json(n->i());
      case fb::NodeKind::Double:
        return Real(n->d());
      case fb::NodeKind::ComplexDouble:
        return json{{"real", Real(n->d())}, {"imag", Real(n->d_imag())}};
      case fb::NodeKind::String:
        return json(n->s() ? n->s()->str() : "");
      case fb::NodeKind::Device:
        return json{{"device", n->s() ? n->s()->str() : ""}};
      case fb::NodeKind::Tensor: {
        tensors_seen++;
        if (!with_tensors_) return std::nullopt;
        std::string param = n->s() ? n->s()->str() : "";
        json j{{"tensor", param}};
        auto it = tensors_.find(param);
        if (it != tensors_.end()) j.update(TensorBrief(*it->second));
        return j;
      }
      case fb::NodeKind::List:
      case fb::NodeKind::Tuple: {
        json arr = json::array();
        bool any = false, dropped = false;
        if (n->items()) {
          for (const auto* item : *n->items()) {
            auto v = Render(item, depth + 1);
            if (v) {
              arr.push_back(std::move(*v));
              any = true;
            } else {
              dropped = true;
            }
          }
        }
        if (dropped && !any) return std::nullopt;
        return arr;
      }
      case fb::NodeKind::Bytes: {
        // Shown as hex, like Python's bytes.hex(), at most 64 bytes of it.
        static const char* kHex = "0123456789abcdef";
        std::string hex;
        const size_t n_bytes = n->data() ? n->data()->size() : 0;
        for (size_t i = 0; i < n_bytes && i < 64; ++i) {
          hex += kHex[n->data()->Get(i) >> 4];
          hex += kHex[n->data()->Get(i) & 15];
        }
        json j{{"bytes", n_bytes}, {"hex", hex}};
        return j;
      }
      case fb::NodeKind::BigInt:
        return json{{"int", n->s() ? n->s()->str() : ""}};
      case fb::NodeKind::Object: {
        // {"object": "module:qualname", "value": payload}
        const fb::Node* payload = n->items() && n->items()->size() ? n->items()->Get(0) : nullptr;
        auto v = Render(payload, depth + 1);
        if (!v) return std::nullopt;
        return json{{"object", n->s() ? n->s()->str() : ""}, {"value", std::move(*v)}};
      }
      case fb::NodeKind::Dict: {
        json obj = json::object();
        bool dropped = false;
        if (n->items()) {
          for (flatbuffers::uoffset_t k = 0; k < n->items()->size(); ++k) {
            const fb::Node* key = n->keys() && k < n->keys()->size() ? n->keys()->Get(k) : nullptr;
            auto v = Render(n->items()->Get(k), depth + 1);
            if (!v) {
              dropped = true;
              continue;
            }
            obj[KeyString(key)] = std::move(*v);
          }
        }
        if (dropped && obj.empty()) return std::nullopt;
        return obj;
      }
    }
    return json("<unknown node kind>");
  }

 private:
  static json Real(double v) {
    if (std::isnan(v)) return "nan";
    if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
    return v;
  }
  static std::string KeyString(const fb::Node* k) {
    k = ValueOf(k);
    if (k == nullptr) return "";
    switch (k->kind()) {
      case fb::NodeKind::String:
      case fb::NodeKind::Device:
      case fb::NodeKind::Tensor:
      case fb::NodeKind::BigInt:
        return k->s() ? k->s()->str() : "";
      case fb::NodeKind::Int:
        return std::to_string(k->i());
      case fb::NodeKind::Bool:
        return k->b() ? "true" : "false";
      case fb::NodeKind::Double:
        return std::to_string(k->d());
      default:
        return "<key>";
    }
  }
  const std::map<std::string, const TensorEntry*>& tensors_;
  bool with_tensors_;
};

}  // namespace

Result<json> MetaReport(Browser& b, const std::string& tag, const std::string& file,
                        bool with_tensors) {
  ASSIGN_OR_RETURN(const TagContents* c, b.Contents(tag));
  std::vector<std::string> files;
  if (file.empty()) {
    files = c->info.files;
  } else {
    auto s = b.store().GetFileTree(tag, file);
    if (!s.ok()) return s.status();
    files = {file};
  }
  json out{{"tag", tag}};
  json jf = json::array();
  for (const auto& f : files) {
    ASSIGN_OR_RETURN(std::string bytes, b.store().GetFileTree(tag, f));
    const fb::StateTree* tree = VerifiedStateTree(bytes);
    if (tree == nullptr) return Status::Corruption("state tree of " + FileName(tag, f));
    std::map<std::string, const TensorEntry*> tensors;
    for (const auto& e : c->tensors) {
      if (e.file == f) tensors[e.param] = &e;
    }
    TreeRenderer r(tensors, with_tensors);
    auto state = r.Render(tree->root(), 0);
    jf.push_back({{"file", f},
                  {"tensors", tree->tensors()},
                  {"logical_bytes", tree->logical_bytes()},
                  {"state", state ? std::move(*state) : json::object()}});
  }
  out["files"] = std::move(jf);
  return out;
}

}  // namespace ckptkv::kvb
