#include "topk_gather_plugin.h"

#include <limits>
#include <new>

#include "topk_gather_kernels.h"

using namespace nvinfer1;

namespace tokenskip {
namespace plugin {

namespace {
constexpr char const* kName = "TopKGather";
enum Io : int32_t { kHidden = 0, kScores = 1, kKept = 2, kIndex = 3 };
} // namespace

TopKGatherPlugin::TopKGatherPlugin(int64_t keepNum, int64_t keepDen, int64_t minKeep)
    : mKeepNum(keepNum), mKeepDen(keepDen), mMinKeep(minKeep) {}

char const* TopKGatherPlugin::getPluginName() const noexcept { return kName; }

IPluginV3* TopKGatherPlugin::clone() noexcept {
    return new (std::nothrow) TopKGatherPlugin(mKeepNum, mKeepDen, mMinKeep);
}

int32_t TopKGatherPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                                             int32_t nbInputs) const noexcept {
    if (nbInputs != 2 || nbOutputs != 2) return -1;
    outputTypes[0] = inputTypes[kHidden];
    outputTypes[1] = DataType::kINT64;  // ONNX index type (docs/ops.md)
    return 0;
}

int32_t TopKGatherPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t,
                                          DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& eb) noexcept {
    if (nbInputs != 2 || nbOutputs != 2 || inputs[kHidden].nbDims != 3 || inputs[kScores].nbDims != 2) {
        logError("TopKGather: expects hidden [B,S,H] and scores [B,S]");
        return -1;
    }
    // k = min(S, max(min_keep, ceil(keep_num * S / keep_den))): symbolic, so any S in the profile works
    IDimensionExpr const* S = inputs[kHidden].d[1];
    IDimensionExpr const* num = eb.operation(DimensionOperation::kPROD, *S, *eb.constant(mKeepNum));
    IDimensionExpr const* k = eb.operation(DimensionOperation::kCEIL_DIV, *num, *eb.constant(mKeepDen));
    k = eb.operation(DimensionOperation::kMAX, *k, *eb.constant(mMinKeep));
    k = eb.operation(DimensionOperation::kMIN, *k, *S);
    outputs[0].nbDims = 3;  // kept [B,k,H]
    outputs[0].d[0] = inputs[kHidden].d[0];
    outputs[0].d[1] = k;
    outputs[0].d[2] = inputs[kHidden].d[2];
    outputs[1].nbDims = 2;  // index [B,k]
    outputs[1].d[0] = inputs[kHidden].d[0];
    outputs[1].d[1] = k;
    return 0;
}

bool TopKGatherPlugin::supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                                 int32_t nbOutputs) noexcept {
    if (nbInputs != 2 || nbOutputs != 2 || pos < 0 || pos > 3) return false;
    PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != TensorFormat::kLINEAR) return false;
    switch (pos) {
    case kHidden: return isHiddenType(d.type);
    case kScores: return d.type == DataType::kFLOAT;
    case kKept: return d.type == inOut[kHidden].desc.type;
    default: return d.type == DataType::kINT64;
    }
}

int32_t TopKGatherPlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                          DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept {
    if (nbInputs != 2 || nbOutputs != 2) return -1;
    for (int i = 0; i < 2; ++i) {  // B and S must agree wherever both are known
        int64_t a = in[kHidden].desc.dims.d[i], b = in[kScores].desc.dims.d[i];
        if (a >= 0 && b >= 0 && a != b) {
            logError("TopKGather: hidden and scores disagree on dimension " + std::to_string(i));
            return -1;
        }
    }
    return 0;
}

size_t TopKGatherPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t, DynamicPluginTensorDesc const*,
                                          int32_t) const noexcept {
    Dims const& m = inputs[kHidden].max;
    int64_t S = m.d[1];
    return topk::workspaceSize(int(m.d[0]), int(S), int(m.d[2]), int(keepCount(S, mKeepNum, mKeepDen, mMinKeep)));
}

int32_t TopKGatherPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
                                  void const* const* inputs, void* const* outputs, void* workspace,
                                  cudaStream_t stream) noexcept {
    Dims const& hd = inputDesc[kHidden].dims;
    Dims const& sd = inputDesc[kScores].dims;
    int64_t const B = hd.d[0], S = hd.d[1], H = hd.d[2];
    int64_t const k = keepCount(S, mKeepNum, mKeepDen, mMinKeep);
    int64_t const maxInt = std::numeric_limits<int32_t>::max();
    if (sd.d[0] != B || sd.d[1] != S || outputDesc[1].dims.d[1] != k || B > maxInt || S > maxInt || H > maxInt) {
        logError("TopKGather: runtime shapes do not match (hidden [B,S,H], scores [B,S], index [B,k])");
        return -1;
    }
    ElemKind ek;
    if (!toElemKind(inputDesc[kHidden].type, ek)) return -1;
    cudaError_t err = topk::launchTopKGather(ek, IndexKind::kI64, inputs[kHidden], static_cast<float const*>(inputs[kScores]),
                                             int(B), int(S), int(H), int(k), outputs[0], outputs[1], workspace, stream);
    if (err != cudaSuccess) {
        logError(std::string("TopKGather: kernel launch failed: ") + cudaGetErrorString(err));
        return -1;
    }
    return 0;
}

PluginFieldCollection const* TopKGatherPlugin::getFieldsToSerialize() noexcept {
    mFields.set({PluginField("keep_num", &mKeepNum, PluginFieldType::kINT64, 1),
                 PluginField("keep_den", &mKeepDen, PluginFieldType::kINT64, 1),
                 PluginField("min_keep", &mMinKeep, PluginFieldType::kINT64, 1)});
    return mFields.get();
}

// ------------------------------------------------------------------------------------ creator
TopKGatherCreator::TopKGatherCreator() {
    mFields.set({PluginField("keep_num", nullptr, PluginFieldType::kINT64, 1),
                 PluginField("keep_den", nullptr, PluginFieldType::kINT64, 1),
                 PluginField("min_keep", nullptr, PluginFieldType::kINT64, 1)});
}

char const* TopKGatherCreator::getPluginName() const noexcept { return kName; }

IPluginV3* TopKGatherCreator::createPlugin(char const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept {
    int64_t num = 0, den = 0, minKeep = 0;
    // all three are required: torch.export drops arguments equal to defaults, so none has one
    if (!readIntField(fc, kName, "keep_num", num) || !readIntField(fc, kName, "keep_den", den) ||
        !readIntField(fc, kName, "min_keep", minKeep))
        return nullptr;
    if (num < 0 || den < 1 || minKeep < 1 || num > std::numeric_limits<int32_t>::max() ||
        den > std::numeric_limits<int32_t>::max()) {
        logError("TopKGather: need keep_num >= 0, keep_den >= 1, min_keep >= 1 (got " + std::to_string(num) + "/" +
                 std::to_string(den) + ", min_keep " + std::to_string(minKeep) + ")");
        return nullptr;
    }
    return new (std::nothrow) TopKGatherPlugin(num, den, minKeep);
}

} // namespace plugin
} // namespace tokenskip
