using System;
using System.Collections.Concurrent;
using System.Collections.Generic;
using System.Threading.Tasks;
using UnityEngine;
using UnityEngine.Events;

namespace Zyke.Unity
{
    [Serializable] public class ZykeReplyEvent : UnityEvent<string, string, string> { }
    [Serializable] public class ZykeTextEvent : UnityEvent<string> { }
    [Serializable] public class ZykeErrorEvent : UnityEvent<string, string> { }

    /// <summary>
    /// An NPC driven by the local zyke-daemon. Set persona, actions and emotions in the inspector, call
    /// Say(text) and handle OnReply (say, emotion, action). The client works on background threads;
    /// everything this component raises is queued and run in Update, on the main thread.
    /// </summary>
    [AddComponentMenu("Zyke/Zyke NPC")]
    public class ZykeNPC : MonoBehaviour
    {
        [Tooltip("Unique per game; defaults to the GameObject's name made valid (\"Brom (1)\" -> \"brom_1\"). " +
                 "Letters, digits, _ . - only, at most 64.")]
        public string npcId = "";
        public string displayName = "";
        [Tooltip("Who the NPC is, in a few sentences. Empty: a neutral default (a warning is logged).")]
        [TextArea(3, 10)] public string persona = "";
        public string[] actions = { "none" };
        public string[] emotions = { "neutral" };
        [Tooltip("Optional: what each action means, by index of actions (empty for none). The model reads them, " +
                 "so game-specific labels like ferry_across get used when they fit.")]
        public string[] actionDescriptions = { };
        [Tooltip("Optional: what each emotion means, by index of emotions (empty for none).")]
        public string[] emotionDescriptions = { };
        [Tooltip("Optional; must be one of actions (otherwise it is left out, with an error logged).")]
        public string defaultAction = "";
        [Tooltip("Optional; must be one of emotions (otherwise it is left out, with an error logged).")]
        public string defaultEmotion = "";
        [Range(0, 200)] public int maxHistory = 12;

        [Header("Safety")]
        [Tooltip("Who this NPC speaks to: \"minor\", \"teen\" or \"adult\" (empty: the daemon's audience). It can " +
                 "only narrow the daemon's setting; the stricter of the two applies (docs/SAFETY.md).")]
        public string audience = "";
        [Tooltip("Optional: the action a reply takes when the daemon deflects the player's line (default: refuse " +
                 "when declared, else none). Must be one of actions.")]
        public string refusalAction = "";
        [Tooltip("Optional: extra words or phrases this NPC never says.")]
        public string[] blockedWords = { };

        [Header("Experience")]
        [Tooltip("Opt this NPC in to experience recording: its replies and the feedback on them are kept on the " +
                 "player's machine when the daemon records too (zyke-daemon start --record-experience).")]
        public bool recordExperience = false;

        [Header("Generation")]
        [Range(1, 1024)] public int maxTokens = 64;
        [Range(0f, 2f)] public float temperature = 0.7f;
        public bool stream = true;
        [Tooltip("How soon the daemon serves this NPC's lines: \"foreground\" for the NPC the player talks to, " +
                 "\"normal\", or \"background\" for chatter (shorter replies, may be dropped at a deadline).")]
        public string priority = "normal";

        [Header("Events (main thread)")]
        public ZykeReplyEvent OnReply = new ZykeReplyEvent();
        public ZykeTextEvent OnDelta = new ZykeTextEvent();
        public ZykeErrorEvent OnError = new ZykeErrorEvent();

        /// <summary>Raised with the full result (usage, timings, request id) after OnReply.</summary>
        public event Action<SayResult> ReplyReceived;

        static ZykeClient _shared;
        static readonly object SharedLock = new object();

        /// <summary>The client every ZykeNPC uses unless Client is set; created on first use from
        /// ZYKE_URL/ZYKE_TOKEN or the daemon's files. Replace it before the first NPC wakes to configure it.</summary>
        public static ZykeClient SharedClient
        {
            get { lock (SharedLock) return _shared ?? (_shared = new ZykeClient()); }
            set { lock (SharedLock) _shared = value; }
        }

        /// <summary>This NPC's client (SharedClient by default).</summary>
        public ZykeClient Client { get; set; }

        readonly ConcurrentQueue<Action> _mainThread = new ConcurrentQueue<Action>();
        Task _defined;

        void Awake()
        {
            if (string.IsNullOrEmpty(npcId)) npcId = NpcSpecRepair.ValidId(name);
            else if (!NpcSpecRepair.IsValidId(npcId))
            {
                string valid = NpcSpecRepair.ValidId(npcId);
                Debug.LogError("ZykeNPC '" + name + "': npcId \"" + npcId + "\" is not a valid id (letters, digits, _ . - only, " +
                               "at most 64); using \"" + valid + "\"", this);
                npcId = valid;
            }
            if (Client == null) Client = SharedClient;
        }

        void Start()
        {
            Define();
        }

        void Update()
        {
            Action action;
            while (_mainThread.TryDequeue(out action))
            {
                try { action(); }
                catch (Exception e) { Debug.LogException(e, this); }
            }
        }

        /// <summary>(Re)send the definition, e.g. after changing the persona at runtime. Inspector values the
        /// daemon would refuse are fixed first (see Problems()), each logged as an error or warning on this
        /// GameObject. If the daemon is not up yet the client remembers the definition and sends it on connect.</summary>
        public Task Define()
        {
            var problems = new List<SpecProblem>();
            var spec = Spec(problems);
            foreach (var problem in problems)
            {
                string text = "ZykeNPC '" + name + "' (" + spec.Id + "): " + problem.Message;
                if (problem.IsError) Debug.LogError(text, this);
                else Debug.LogWarning(text, this);
            }
            _defined = Client.DefineAsync(spec);
            Watch(_defined);
            return _defined;
        }

        /// <summary>The NpcSpec for this component, always one the daemon accepts.</summary>
        public NpcSpec Spec()
        {
            return Spec(null);
        }

        /// <summary>What in the inspector values the daemon would refuse, and how Spec() fixes it.</summary>
        public List<SpecProblem> Problems()
        {
            var problems = new List<SpecProblem>();
            Spec(problems);
            return problems;
        }

        NpcSpec Spec(List<SpecProblem> problems)
        {
            var spec = new NpcSpec(npcId, persona, actions ?? new string[0], emotions ?? new string[0]) { MaxHistory = maxHistory };
            Describe(spec.ActionDescriptions, actions, actionDescriptions);
            Describe(spec.EmotionDescriptions, emotions, emotionDescriptions);
            if (!string.IsNullOrEmpty(displayName)) spec.Name = displayName;
            if (!string.IsNullOrEmpty(defaultAction)) spec.DefaultAction = defaultAction;
            if (!string.IsNullOrEmpty(defaultEmotion)) spec.DefaultEmotion = defaultEmotion;
            if (!string.IsNullOrEmpty(audience)) spec.Audience = audience;
            if (!string.IsNullOrEmpty(refusalAction)) spec.RefusalAction = refusalAction;
            if (blockedWords != null && blockedWords.Length > 0) spec.BlockedWords = new List<string>(blockedWords);
            spec.Record = recordExperience;
            return NpcSpecRepair.Repair(spec, name, problems);
        }

        static void Describe(Dictionary<string, string> into, string[] names, string[] descriptions)
        {
            if (names == null || descriptions == null) return;
            for (int i = 0; i < names.Length && i < descriptions.Length; i++)
                if (!string.IsNullOrEmpty(descriptions[i]) && names[i] != null) into[names[i]] = descriptions[i];
        }

        /// <summary>Say something to this NPC (game state optional). Returns the request id; the
        /// answer comes through OnDelta/OnReply/OnError on the main thread. allowedActions narrows
        /// this line to some of the declared actions (e.g. only "none" and "refuse" while the shop is
        /// closed); an undeclared name fails with OnError("unknown_action", ...).</summary>
        public string Say(string text, IDictionary<string, object> state = null, IList<string> allowedActions = null)
        {
            string requestId = Client.NewRequestId();
            SayAsync(text, state, requestId, allowedActions);
            return requestId;
        }

        /// <summary>Awaitable variant; the events still fire. Continuations run where Unity's
        /// SynchronizationContext puts them (the main thread when awaited from it).</summary>
        public Task<SayResult> SayAsync(string text, IDictionary<string, object> state = null, string requestId = null,
                                        IList<string> allowedActions = null)
        {
            var request = new SayRequest
            {
                NpcId = npcId, Input = text, State = state, RequestId = requestId, AllowedActions = allowedActions,
                Options = new GenerationOptions { MaxTokens = maxTokens, Temperature = temperature },
                // normal is the daemon's default: not sending it keeps older daemons working
                Priority = string.IsNullOrEmpty(priority) || priority == "normal" ? null : priority,
            };
            if (stream) request.OnDelta = piece => _mainThread.Enqueue(() => OnDelta.Invoke(piece));
            var task = SayAfterDefine(request);
            Watch(task, result => _mainThread.Enqueue(() =>
            {
                OnReply.Invoke(result.Reply.Say, result.Reply.Emotion, result.Reply.Action);
                if (ReplyReceived != null) ReplyReceived(result);
            }));
            return task;
        }

        async Task<SayResult> SayAfterDefine(SayRequest request)
        {
            if (_defined != null)
            {
                try { await _defined; } catch (ZykeException) { }
            }
            return await Client.SayAsync(request);
        }

        /// <summary>This NPC's state (definition and history) as JSON for the game's save file.</summary>
        public Task<string> SaveStateAsync()
        {
            return Client.GetStateJsonAsync(npcId);
        }

        /// <summary>Restore what SaveStateAsync returned.</summary>
        public async Task LoadStateAsync(string stateJson)
        {
            var restored = await Client.SetStateJsonAsync(stateJson);
            var spec = NpcSpec.FromJson(JsonRead.Obj(restored, "npc"));
            _mainThread.Enqueue(() =>
            {
                persona = spec.Persona;
                actions = spec.Actions.ToArray();
                emotions = spec.Emotions.ToArray();
                actionDescriptions = spec.Actions.ConvertAll(a => spec.ActionDescriptions.ContainsKey(a) ? spec.ActionDescriptions[a] : "").ToArray();
                emotionDescriptions = spec.Emotions.ConvertAll(e => spec.EmotionDescriptions.ContainsKey(e) ? spec.EmotionDescriptions[e] : "").ToArray();
                displayName = spec.Name ?? "";
            });
        }

        public Task ResetAsync()
        {
            return Client.ResetAsync(npcId);
        }

        /// <summary>Rate one of this NPC's replies after the fact: requestId is what Say returned (or
        /// SayResult.RequestId), reward from -1 to 1, label what would have been right (e.g. Action = "refuse").
        /// Needs recordExperience and a daemon that records; failures also arrive on OnError.</summary>
        public Task FeedbackAsync(string requestId, double reward, FeedbackLabel label = null, string source = null)
        {
            var task = Client.FeedbackAsync(npcId, requestId, reward, label, source);
            Watch(task);
            return task;
        }

        void Watch<T>(Task<T> task, Action<T> onResult)
        {
            task.ContinueWith(t =>
            {
                if (t.IsFaulted) ReportError(t.Exception);
                else if (!t.IsCanceled) onResult(t.Result);
            }, TaskScheduler.Default);
        }

        void Watch(Task task)
        {
            task.ContinueWith(t => ReportError(t.Exception), TaskContinuationOptions.OnlyOnFaulted);
        }

        void ReportError(AggregateException failure)
        {
            if (failure == null) return;
            Exception inner = failure.InnerException ?? failure;
            var error = inner as ZykeException;
            string code = error != null ? error.Code : ProtocolConstants.ErrorCodes.Internal;
            _mainThread.Enqueue(() => OnError.Invoke(code, inner.Message));
        }
    }
}
