using UnityEngine;
using UnityEngine.UI;
using Zyke.Unity;

namespace Zyke.Samples
{
    /// <summary>
    /// Sample scene script: put a ZykeNPC on a character, a TextMesh (speech bubble) above it and an
    /// InputField on a Canvas, then wire them here. Start zyke-daemon before pressing Play.
    /// </summary>
    public class TavernDemo : MonoBehaviour
    {
        public ZykeNPC npc;
        public TextMesh speechBubble;
        public TextMesh mood;
        public InputField input;

        void Start()
        {
            npc.OnDelta.AddListener(piece =>
            {
                speechBubble.text = speechBubble.text == "..." ? piece : speechBubble.text + piece;
            });
            npc.OnReply.AddListener((say, emotion, action) =>
            {
                speechBubble.text = say;
                mood.text = "[" + emotion + " / " + action + "]";
                if (action == "attack") Debug.Log(npc.displayName + " attacks!");
            });
            npc.OnError.AddListener((code, message) => speechBubble.text = "(" + code + ") " + message);
            input.onEndEdit.AddListener(OnSubmit);
        }

        void OnSubmit(string text)
        {
            if (string.IsNullOrEmpty(text.Trim())) return;
            input.text = "";
            speechBubble.text = "...";
            npc.Say(text, new System.Collections.Generic.Dictionary<string, object>
            {
                { "location", "tavern" }, { "time_of_day", "evening" },
            });
        }

        /// <summary>Example save/load hooks for a game's save system.</summary>
        public async void SaveGame()
        {
            string json = await npc.SaveStateAsync();
            PlayerPrefs.SetString("zyke.npc." + npc.npcId, json);
        }

        public async void LoadGame()
        {
            string json = PlayerPrefs.GetString("zyke.npc." + npc.npcId, "");
            if (json != "") await npc.LoadStateAsync(json);
        }
    }
}
